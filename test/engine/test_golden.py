"""The reference model against openpi's own outputs on the tiny golden checkpoint (float32 everywhere)."""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.reference import Pi05Model, euler_schedule

# float32 end to end through a few hundred ops: agreement to ~1e-6 relative is expected; 1e-5 leaves margin.
RTOL_F32 = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", [0, 1, 2])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_actions_match_openpi(golden_model: Pi05Model, golden_cases, case_inputs, case: int, steps: int) -> None:
    out = golden_model.sample_actions(case_inputs(case), steps)
    ref = golden_cases[f"case{case}/actions_steps{steps}"]
    assert out.shape == ref.shape
    assert rel_err(out, ref) < RTOL_F32
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_image_embedding_matches(golden_model: Pi05Model, golden_cases) -> None:
    for case in range(3):
        images = golden_cases[f"case{case}/image0"]
        out = golden_model.embed_images(images)
        assert rel_err(out, golden_cases[f"case{case}/img_emb0"]) < RTOL_F32


@pytest.mark.parametrize("case", [0, 1, 2])
def test_prefix_cache_matches_at_valid_positions(golden_model: Pi05Model, golden_cases, case_inputs, case: int) -> None:
    inputs = case_inputs(case)
    prefix, valid = golden_model.embed_prefix(inputs)
    cache = golden_model.prefill(prefix, valid)
    mask = golden_cases[f"case{case}/prefix_pad_mask"]
    ref_prefix = golden_cases[f"case{case}/prefix_embs"]
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        assert int(cache.lengths[row]) == n
        assert rel_err(prefix[row, :n], ref_prefix[row][mask[row]]) < RTOL_F32
        for layer in (0, 2):
            for kind, ours in (("k", cache.keys[layer]), ("v", cache.values[layer])):
                ref = golden_cases[f"case{case}/kv_{kind}_l{layer}"][row][:, mask[row]]
                # the golden K/V came from the unpacked (792-token) layout: 1.8e-6 is the measured packing effect
                assert rel_err(ours[row, :, :n], ref) < RTOL_F32, (row, layer, kind)


@pytest.mark.parametrize("case", [0, 1, 2])
def test_first_velocity_and_positions(golden_model: Pi05Model, golden_cases, case_inputs, case: int) -> None:
    inputs = case_inputs(case)
    prefix, valid = golden_model.embed_prefix(inputs)
    cache = golden_model.prefill(prefix, valid)
    batch = inputs.noise.shape[0]
    v = golden_model.velocity(inputs.noise, torch.ones(batch), cache)
    assert rel_err(v, golden_cases[f"case{case}/v_t_first"]) < RTOL_F32
    horizon = inputs.noise.shape[1]
    suffix_pos = cache.lengths[:, None] + torch.arange(horizon)
    assert torch.equal(suffix_pos, golden_cases[f"case{case}/suffix_position_ids"])


def test_euler_schedule_is_openpi_float32() -> None:
    times = [t for t, _ in euler_schedule(10)]
    ref = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert len(times) == 10
    assert times[2] == pytest.approx(0.79999995, abs=1e-8) and times[2] != 0.8  # accumulated in float32
    assert times == pytest.approx(ref, abs=1e-6)


def test_euler_schedule_matches_golden_times(golden_cases) -> None:
    ref = golden_cases["case0/times_steps10"].tolist()
    assert [t for t, _ in euler_schedule(10)] == ref  # bit-exact: same float32 accumulation

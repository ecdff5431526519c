"""The fast path's re-packed model (folded norms, fused GEMMs, precomputed adaRMS, GQA-folded attention)
against openpi's golden outputs, on CPU. The CUDA graphs and FP8 around it are tested in test/gpu."""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.fast.blocks import FastModel, prefix_capacity, sample_eager
from pi05_ros.engine.reference import Pi05Model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_fast_model_float32_matches_openpi(golden_model: Pi05Model, golden_cases, fast_case, case: int,
                                          steps: int) -> None:
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(case)
    out = sample_eager(fast, images, rows, noise, steps)
    # float32 throughout; folding norms into weights reorders a few products: ~2e-7 measured
    assert rel_err(out, golden_cases[f"case{case}/actions_steps{steps}"][0]) < 1e-5


def test_fast_model_bfloat16_within_bf16_tolerance(golden_model: Pi05Model, golden_cases, fast_case) -> None:
    fast = FastModel(golden_model, torch.bfloat16)
    images, rows, noise = fast_case(1)
    out = sample_eager(fast, images, rows, noise, 10)
    assert rel_err(out, golden_cases["case1/actions_steps10"][0]) < 1e-2  # bf16 GEMM inputs: ~1e-3 measured


def test_padding_tile_changes_nothing(golden_model: Pi05Model, fast_case) -> None:
    """Text padded to a tile is masked out: any tile size gives the same actions."""
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(0)
    a = sample_eager(fast, images, rows, noise, 3, tile=1)
    b = sample_eager(fast, images, rows, noise, 3, tile=16)
    assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_carry_changes_no_value(golden_model: Pi05Model, fast_case, dtype: torch.dtype) -> None:
    """Each layer's last residual add done by the next layer (FastModel.carry_residual) performs the
    same additions in the same order as each layer adding its own: the K/V caches and the actions are equal bit for
    bit, and so is a guided (real-time chunking) step, whose VJP runs through the carried adds."""
    from pi05_ros.engine.fast.blocks import denoise_eager, prefill_eager
    from pi05_ros.engine.reference import euler_schedule

    fast = FastModel(golden_model, dtype)
    images, rows, noise = fast_case(1)
    previous = torch.randn(1, *noise.shape, generator=torch.Generator().manual_seed(3))
    weights = torch.linspace(1, 0, noise.shape[0]).view(1, -1, 1).expand_as(previous).contiguous()
    results = {}
    for carry in (True, False):
        fast.carry_residual = carry
        prefix = prefill_eager(fast, images, rows)
        actions = denoise_eager(fast, prefix, noise, 3)
        mods, final, out_w, out_b = fast.step_schedule(2)
        x = noise[None].to(actions.dtype).clone()
        for step, (t, dt) in enumerate(euler_schedule(2)):
            fast.guided_step(x, prefix.n_valid, prefix.keys, prefix.values, mods[step], final[step], out_w, out_b,
                             t, dt, previous, weights, 5.0, compiled=False)
        results[carry] = (prefix.keys, prefix.values, actions, x)
    from pi05_ros.engine.fast.pipeline import Pi05Pipeline

    options = {"precision": "bf16", "use_graphs": False, "compile": False}
    assert Pi05Pipeline(golden_model, **options).fast.carry_residual  # the pipeline's default (§70)
    assert not Pi05Pipeline(golden_model, carry_residual=False, **options).fast.carry_residual
    assert not FastModel(golden_model, dtype).carry_residual  # the bare model adds per layer until told
    for with_carry, without in zip(results[True], results[False], strict=True):
        for a, b in zip(with_carry if isinstance(with_carry, list) else [with_carry],
                        without if isinstance(without, list) else [without], strict=True):
            assert torch.equal(a, b)


def test_adarms_dense_is_precomputed(golden_model: Pi05Model) -> None:
    fast = FastModel(golden_model, torch.float32)
    mods, final, out_w, out_b = fast.step_schedule(10)
    cfg = golden_model.cfg
    assert mods.shape == (10, cfg.expert.depth, 6, cfg.expert.width) and final.shape == (10, 2, cfg.expert.width)
    torch.testing.assert_close(out_w, golden_model.action_out_proj.weight * -0.1)  # dt folded into the head
    assert not any("dense" in name for name, _ in fast.named_buffers())  # expert norm weights are not kept


def test_prefix_capacity() -> None:
    from pi05_ros.engine.config import PRESETS

    cfg = PRESETS["pi05"]
    assert prefix_capacity(cfg, 2, 48, 16) == (48, 560)
    assert prefix_capacity(cfg, 2, 49, 16) == (64, 576)
    assert prefix_capacity(cfg, 3, 200, 16) == (208, 976)


def test_release_reference_frees_packed_weights_and_keeps_results(golden_dir, golden_cases, fast_case) -> None:
    from pi05_ros.engine.checkpoint import load_model

    model, _ = load_model(golden_dir)
    images, rows, noise = fast_case(0)
    fast = FastModel(model, torch.float32, release_reference=True)
    assert model.released
    assert model.vlm.layers[0].mlp.up_proj.weight.numel() == 0  # the reference's copy is gone
    assert model.time_mlp_in.weight.numel() > 0  # schedules still need the time MLP and adaRMS layers
    out = sample_eager(fast, images, rows, noise, 3)
    assert rel_err(out, golden_cases["case0/actions_steps3"][0]) < 1e-5
    with pytest.raises(RuntimeError, match="released"):
        model.sample_actions(None, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", [1, 3])
def test_fast_model_batch_equals_its_rows(golden_model: Pi05Model, fast_case, steps: int) -> None:
    """A batch of rows with their own images, prompt lengths (9, 17 and 3 tokens: two different text tiles at
    tile 8) and noise gives each row what it gets alone: per-row key masks and suffix positions."""
    from pi05_ros.engine.fast.blocks import denoise_eager, prefill_eager_batch

    fast = FastModel(golden_model, torch.float32)
    images0, rows0, noise0 = fast_case(0)  # 2 views
    images1, rows1, noise1 = fast_case(1)  # 3 views: its first 2 make a second 2-view row
    rows = [(images0, rows0, noise0), (images1[:2], rows1, noise1), (images1[1:], rows0[:3], 0.5 * noise0)]
    alone = torch.stack([sample_eager(fast, images, text, noise, steps, tile=8) for images, text, noise in rows])
    prefix = prefill_eager_batch(fast, torch.stack([r[0] for r in rows]), [r[1] for r in rows], tile=8)
    assert prefix.n_valid.tolist() == [2 * fast.cfg.vision.num_patches + n for n in (9, 17, 3)]
    together = denoise_eager(fast, prefix, torch.stack([r[2] for r in rows]), steps)
    # float32; batched GEMMs and the longer padding reorder sums: ~1e-7 expected
    assert rel_err(together, alone) < 1e-5
    for row in range(3):
        assert rel_err(together[row], alone[row]) < 1e-5


def test_patch_embedding_gemm_equals_the_convolution(golden_model: Pi05Model) -> None:
    """embed_patches (patches flattened into one GEMM) against SigLIP's stride-p convolution, its definition."""
    import torch.nn.functional as F

    from pi05_ros.engine.fast.blocks import embed_patches

    emb = golden_model.vision.embeddings
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=gen)
    x = images.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
    conv = F.conv2d(x, emb.patch_embedding.weight.float(), emb.patch_embedding.bias.float(),
                    stride=emb.patch_embedding.stride)
    want = conv.flatten(2).transpose(1, 2) + emb.position_embedding.weight.float()
    got = embed_patches(images, emb.patch_embedding.weight.float().flatten(1), emb.patch_embedding.bias.float(),
                        emb.position_embedding.weight.float(), emb.patch_embedding.stride[0])
    assert got.shape == want.shape == (3, 256, emb.patch_embedding.weight.shape[0])
    # float32: the same products, summed in another order
    assert rel_err(got, want) < 1e-6


def test_siglip_fc1_gelu_op_and_its_routing() -> None:
    """fc1 + GELU as one op (a cuBLASLt epilogue on CUDA) equals the linear then the tanh GELU; a routed linear (FP8
    calibration's recorder, the emulator) and an FP8 fc1 still go through the linear function."""
    from pi05_ros.engine.fast.blocks import _mlp_hidden, linear, linear_gelu_tanh

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=gen)
    weight, bias = torch.randn(24, 16, generator=gen), torch.randn(24, generator=gen)
    want = torch.nn.functional.gelu(torch.nn.functional.linear(h, weight, bias), approximate="tanh")
    torch.testing.assert_close(linear_gelu_tanh(h.reshape(10, 16), weight, bias).view(2, 5, 24), want,
                               rtol=0, atol=0)  # the same float32 ops on the CPU
    fc1 = (weight, bias, None, None, None)
    torch.testing.assert_close(_mlp_hidden(h, fc1, linear), want, rtol=0, atol=0)
    seen = []

    def recording(x, p):  # noqa: ANN001, ANN202
        seen.append(x.shape)
        return linear(x, p)

    torch.testing.assert_close(_mlp_hidden(h, fc1, recording), want, rtol=0, atol=0)
    assert seen == [h.shape]  # calibration still sees fc1's input
    torch.library.opcheck(linear_gelu_tanh, (h.reshape(10, 16), weight, bias))

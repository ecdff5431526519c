"""The fast CUDA pipeline against the float32 reference: full-size random weights and the golden model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05_ros.engine.checkpoint import load_model
from pi05_ros.engine.config import PRESETS
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast.calibration import synthetic_observations
from pi05_ros.engine.fast.pipeline import FP8_DEFAULT_LAYERS, Pi05Pipeline, kernels_measured
from pi05_ros.engine.reference import Pi05Model
from pi05_ros.engine.runner import PreparedObservation, ReferenceRunner

pytestmark = pytest.mark.gpu

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "pi05_tiny"  # in the repository
# Relative L2 bounds from issue 3 (openpi's own bf16 mixed precision measures ~1e-2). FP8 in all of Gemma's linears
# measured 3.05e-2 at 1 step on an H100 (docs/benchmarks.md §70), over the fp8 budget: it stays opt-in, and its
# bound here only guards it against getting worse.
BOUND = {"bf16": 2e-2, "fp8": 3e-2, "fp8_vision": 5e-2, "fp8_prefix_all": 4e-2}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_actions(model: Pi05Model, obs: PreparedObservation, steps: int) -> np.ndarray:
    return ReferenceRunner(model).run(obs, steps)[0]


@pytest.fixture(scope="module")
def full_model() -> Pi05Model:
    return random_model(PRESETS["pi05"], seed=0, device="cuda", dtype=torch.float32)


@pytest.fixture(scope="module")
def observation(full_model: Pi05Model) -> PreparedObservation:
    obs = next(iter(synthetic_observations(full_model.cfg, 1, views=2, seed=123)))
    mask = np.arange(full_model.cfg.max_token_len) < 48  # a ~48-token prompt
    return PreparedObservation(obs.images, np.where(mask, obs.tokens, 0), mask, obs.noise)


@pytest.fixture(scope="module")
def reference(full_model: Pi05Model, observation: PreparedObservation) -> dict[int, np.ndarray]:
    return {steps: reference_actions(full_model, observation, steps) for steps in (1, 10)}


# fp8 = the default FP8 layer set (Gemma's MLP); fp8_prefix_all adds Gemma's qkv and o: 0.58 ms less prefill at a
# batch of 8 (H100, docs/benchmarks.md §63), within the CPU emulator's budget (§19) but not at full size (§70)
@pytest.mark.parametrize("variant", ["bf16", "fp8", "fp8_vision", "fp8_prefix_all"])
def test_full_size_fidelity(full_model, observation, reference, variant: str, record_property) -> None:
    precision = "bf16" if variant == "bf16" else "fp8"
    layers = ("prefix_blocks.*",) if variant == "fp8_prefix_all" else FP8_DEFAULT_LAYERS
    pipe = Pi05Pipeline(full_model, precision=precision, fp8_vision=variant == "fp8_vision", fp8_layers=layers)
    for steps in (1, 10):
        actions, timings = pipe.run(observation, steps)
        err = rel_err(actions, reference[steps])
        print(f"FIDELITY {variant} steps={steps} denoise on {pipe.expert_path} rel_l2={err:.4e} "
              f"total_gpu_ms={sum(timings.values()):.2f}")
        record_property(f"{variant}_{steps}", err)
        assert err <= BOUND[variant], (variant, steps, err)


def test_prefix_mlp_fused_into_its_fp8_gemm(full_model, observation, reference, monkeypatch) -> None:
    """kernels/geglu.py at full size, where it stores e4m3 itself (the CPU tests run it under the interpreter, which
    cannot): the FP8 pipeline with the prefix MLP's GeGLU in its gate_up kernel stays within the FP8 budget, and
    its actions follow the two-GEMM pipeline's (batch_stages_gpu.py measured 7.5e-4 between the two on an H100 at
    batch 1, docs/benchmarks.md §63)."""
    from pi05_ros.engine.fast.kernels import geglu

    launches: list[tuple[int, ...]] = []
    real = geglu.launch
    monkeypatch.setattr(geglu, "launch", lambda *a, **kw: launches.append(tuple(a[0].shape)) or real(*a, **kw))
    mlp_layers = full_model.cfg.vlm.depth - 1  # the last layer computes K/V only
    two_gemm = Pi05Pipeline(full_model, precision="fp8", prefix_fused_mlp=False)
    fused = Pi05Pipeline(full_model, precision="fp8", fp8_scales=two_gemm.fp8_scales, prefix_fused_mlp=True)
    # the default where measured (Hopper), not elsewhere
    assert Pi05Pipeline(full_model, precision="fp8", fp8_scales=two_gemm.fp8_scales).fast.prefix_fused_mlp == (
        kernels_measured(torch.device("cuda")))
    for steps in (1, 10):
        launches.clear()
        want, _ = two_gemm.run(observation, steps)
        assert launches == []  # the two-GEMM pipeline never takes the kernel
        got, _ = fused.run(observation, steps)
        # Python reaches the op only while the prefill is warmed up and captured (replays run the graph): every
        # MLP layer each time, on the prefix's rows (the first call only; the step count does not recapture it)
        if steps == 1:
            assert launches and len(launches) % mlp_layers == 0, len(launches)
            assert len({shape for shape in launches}) == 1 and launches[0][1] == full_model.cfg.vlm.width
        else:
            assert launches == []
        err = rel_err(got, reference[steps])
        apart = rel_err(got, want)
        print(f"FUSED MLP steps={steps} rel_l2={err:.4e} vs two-GEMM pipeline {apart:.4e} "
              f"(two-GEMM vs reference {rel_err(want, reference[steps]):.4e})")
        assert err <= BOUND["fp8"], (steps, err)
        assert 0 < apart < 1e-2, (steps, apart)  # one e4m3 rounding of some hidden values apart, not a wrong layer


def test_vision_mlp_fused_into_its_fp8_gemm(full_model, observation, reference, monkeypatch) -> None:
    """kernels/geglu.py's GELU form at full size (SigLIP's fc1 with its bias): the FP8 pipeline with SigLIP's MLP
    fused stays within the FP8-with-SigLIP budget and follows the same pipeline with the MLP's two FP8 GEMMs."""
    from pi05_ros.engine.fast.kernels import geglu

    launches: list[tuple[int, ...]] = []
    real = geglu.launch
    monkeypatch.setattr(geglu, "launch", lambda *a, **kw: launches.append(tuple(a[1].shape)) or real(*a, **kw))
    # the prefix MLP's two GEMMs in both (its fused kernel, the default on Hopper, is the same launch): the
    # pipelines differ in SigLIP's MLP alone, and every launch recorded is SigLIP's
    two_gemm = Pi05Pipeline(full_model, precision="fp8", fp8_vision=True, vision_fused_mlp=False,
                            prefix_fused_mlp=False)
    fused = Pi05Pipeline(full_model, precision="fp8", fp8_vision=True, fp8_scales=two_gemm.fp8_scales,
                         vision_fused_mlp=True, prefix_fused_mlp=False)
    vision = full_model.cfg.vision
    for steps in (1, 10):
        launches.clear()
        want, _ = two_gemm.run(observation, steps)
        assert launches == []
        got, _ = fused.run(observation, steps)
        if steps == 1:  # captured once: every SigLIP layer's fc1 weight [mlp, width] while warming up and capturing
            assert launches and len(launches) % vision.depth == 0, len(launches)
            assert set(launches) == {(vision.mlp_dim, vision.width)}
        err = rel_err(got, reference[steps])
        apart = rel_err(got, want)
        print(f"FUSED VISION MLP steps={steps} rel_l2={err:.4e} vs two-GEMM pipeline {apart:.4e} "
              f"(two-GEMM vs reference {rel_err(want, reference[steps]):.4e})")
        assert err <= BOUND["fp8_vision"], (steps, err)
        assert 0 < apart < 2e-2, (steps, apart)  # e4m3 roundings of some hidden values apart, not a wrong layer


def test_residual_carry_follows_the_per_layer_adds(full_model, observation, reference) -> None:
    """FastModel.carry_residual at full size, compiled and in graphs: the same additions as per-layer adds (equal
    bit for bit eagerly, test_fast_blocks.py); compiled, only the fused norms' summation order differs."""
    # the torch path's expert layers (the fused kernels take batch 1 and 2 on Hopper and carry nothing)
    plain = Pi05Pipeline(full_model, precision="fp8", max_batch=2, expert_kernels="off", carry_residual=False)
    carried = Pi05Pipeline(full_model, precision="fp8", fp8_scales=plain.fp8_scales, max_batch=2,
                           expert_kernels="off")  # the default: carried
    for steps in (1, 10):
        want, _ = plain.run(observation, steps)
        got, _ = carried.run(observation, steps)
        apart = rel_err(got, want)
        err = rel_err(got, reference[steps])
        print(f"RESIDUAL CARRY steps={steps} {apart:.3e} from per-layer adds, {err:.3e} from the reference")
        assert apart < 1e-2 and err <= BOUND["fp8"], (steps, apart, err)
    rows, _ = carried.run_batch([observation, observation], 10)
    plain_rows, _ = plain.run_batch([observation, observation], 10)
    assert rel_err(rows, plain_rows) < 1e-2 and rel_err(rows[0], reference[10]) <= BOUND["fp8"]


def test_graph_replay_equals_eager_and_step_switching(full_model, observation) -> None:
    graphs = Pi05Pipeline(full_model, precision="bf16")
    eager = Pi05Pipeline(full_model, precision="bf16", use_graphs=False)
    results = {}
    for steps in (1, 10, 3, 10, 1):  # switching back and forth captures once per count and keeps earlier graphs
        a, _ = graphs.run(observation, steps)
        b, _ = eager.run(observation, steps)
        # same kernels in the same order: equal up to cuBLAS/SDPA run-to-run rounding
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(b).max())
        if steps in results:
            np.testing.assert_array_equal(a, results[steps])  # replay is deterministic
        results[steps] = a
    # one graph of one Euler step serves every count (the step's constants are data)
    assert [key for key in graphs._graphs if key[0] == "denoise_step"] == [("denoise_step", 2, graphs.expert_path, 1)]


def test_step_counts_capture_nothing_new_and_memory_stays_bounded(full_model, observation) -> None:
    """Sweeping denoise_steps 1..50 once grew GPU memory by 1.5 GB and stalled each first use (0.6-1.9 s) when
    every count captured its own graph; now a count costs its schedule only."""
    import time

    pipe = Pi05Pipeline(full_model, precision="fp8")
    pipe.run(observation, 10)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    steady = min(_wall_ms(pipe, observation, 10) for _ in range(5))
    firsts = {}
    for steps in range(1, 51):
        start = time.perf_counter()
        pipe.run(observation, steps)
        firsts[steps] = (time.perf_counter() - start) * 1e3
    grown = (torch.cuda.memory_reserved() - reserved) / 1e6
    per_step = steady / 10
    worst = max(firsts[n] - n * per_step for n in firsts)  # first-use cost beyond the steps themselves
    median = sorted(firsts[n] - n * per_step for n in firsts)[len(firsts) // 2]
    print(f"STEPS 1..50: reserved +{grown:.1f} MB, steady 10-step {steady:.2f} ms, worst first-use overhead "
          f"{worst:.1f} ms (count {max(firsts, key=lambda n: firsts[n] - n * per_step)}), median {median:.1f} ms, "
          f"graphs {len(pipe._graphs)}")
    assert sum(1 for key in pipe._graphs if key[0] == "denoise_step") == 1
    assert grown < 256  # the step table (room for 100 steps, ~122 MB on the kernels) + at most 64 MB of schedules
    # A new count costs its schedule (time MLP, adaRMS, shift products): the worst of the 50 was 83 ms on an H200
    # (count 18, §23) and 134 ms on an H100 (count 1, §48); a graph capture cost 600-1900 ms each.
    assert worst < 300


def _wall_ms(pipe, observation, steps: int) -> float:
    import time

    start = time.perf_counter()
    pipe.run(observation, steps)
    return (time.perf_counter() - start) * 1e3


def test_expert_kernels_agree_with_the_torch_path(full_model, observation, reference) -> None:
    kernels = Pi05Pipeline(full_model, precision="bf16", expert_kernels="on")
    torch_path = Pi05Pipeline(full_model, precision="bf16", expert_kernels="off")
    assert kernels.expert_path == "kernels" and torch_path.expert_path == "torch"
    for steps in (1, 10):
        a, ta = kernels.run(observation, steps)
        b, tb = torch_path.run(observation, steps)
        print(f"EXPERT kernels vs torch steps={steps}: rel_l2 {rel_err(a, b):.3e}, vs fp32 "
              f"{rel_err(a, reference[steps]):.3e} / {rel_err(b, reference[steps]):.3e}; "
              f"denoise {ta['denoise']:.3f} / {tb['denoise']:.3f} ms")
        # two bf16 paths that round differently (the kernels keep GEMM outputs in fp32), each ~5e-3 from fp32
        assert rel_err(a, b) <= 1e-2
        assert rel_err(a, reference[steps]) <= BOUND["bf16"]
        np.testing.assert_array_equal(kernels.run(observation, steps)[0], a)  # fixed-order split-K: deterministic


def test_a_failing_kernel_build_falls_back_to_the_torch_path(full_model, observation, reference, monkeypatch) -> None:
    from pi05_ros.engine.fast.kernels.expert import ExpertKernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Triton failure")

    pipe = Pi05Pipeline(full_model, precision="bf16", expert_kernels="on")
    monkeypatch.setattr(ExpertKernels, "denoise_step", broken)
    actions, _ = pipe.run(observation, 10)
    assert pipe.expert_path == "torch"
    assert rel_err(actions, reference[10]) <= BOUND["bf16"]


def test_prompt_length_changes_reuse_graphs(full_model, observation) -> None:
    pipe = Pi05Pipeline(full_model, precision="bf16")
    for n_text in (40, 41, 45, 48):  # one 16-token tile: the same prefill/denoise graphs serve all
        mask = np.arange(full_model.cfg.max_token_len) < n_text
        obs = PreparedObservation(observation.images, np.where(mask, observation.tokens, 0), mask, observation.noise)
        actions, _ = pipe.run(obs, 3)
        assert rel_err(actions, reference_actions(full_model, obs, 3)) <= BOUND["bf16"]
    assert len(pipe._graphs) == 3


def test_golden_tiny_model_on_gpu() -> None:
    from safetensors.torch import load_file

    model, _ = load_model(GOLDEN, device="cuda")
    cases = load_file(str(GOLDEN / "cases.safetensors"))
    p = "case0/"
    images = [cases[f"{p}image{v}_u8"][0].numpy() if cases[f"{p}image_mask{v}"][0] else None for v in range(3)]
    obs = PreparedObservation(images, cases[p + "tokens"][0].numpy(), cases[p + "token_mask"][0].numpy(),
                              cases[p + "noise"][0].numpy())
    pipe = Pi05Pipeline(model, precision="bf16")
    for steps in (1, 3, 10):
        actions, _ = pipe.run(obs, steps)
        err = rel_err(actions, cases[f"{p}actions_steps{steps}"][0].numpy())
        print(f"GOLDEN bf16 steps={steps} rel_l2={err:.4e}")
        assert err <= BOUND["bf16"]


def test_policy_uses_fast_pipeline_on_gpu_and_releases_reference(tmp_path: Path) -> None:
    from pi05_ros.engine.policy import Policy

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    policy = Policy.demo(device="cuda", precision="fp8")
    assert policy.runner.name == "fast" and policy.model.released
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    chunk = policy.infer({"base_0_rgb": image, "left_wrist_0_rgb": image}, np.zeros(7), "pick up the cube", 10)
    assert chunk.actions.shape == (50, 7) and np.isfinite(chunk.actions).all()
    assert {"vision", "prefill_kv", "denoise", "total"} <= set(chunk.timings)
    # the released reference no longer holds the big weights: only the fast copy sits on the GPU
    held = torch.cuda.memory_allocated() - before
    print(f"POLICY fp8 resident GPU memory {held / 1e9:.2f} GB, peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    assert held < 8e9


def test_fp8_calibration_from_recorded_observations(tmp_path: Path) -> None:
    import json
    import shutil

    from pi05_ros.engine.demo import demo_tokenizer
    from pi05_ros.engine.normalize import Stats, save_norm_stats
    from pi05_ros.engine.policy import Policy
    from pi05_ros.engine.recordings import save_observation

    shutil.copytree(GOLDEN, tmp_path / "ckpt")  # its own copy: the scales file is written beside it
    os.chmod(tmp_path / "ckpt", 0o755)  # writable even if the checkout is not

    stats = Stats(np.zeros(7, np.float32), np.ones(7, np.float32), -np.ones(7, np.float32), np.ones(7, np.float32))
    save_norm_stats(tmp_path / "ckpt" / "assets" / "robot" / "norm_stats.json", stats, stats)
    rng = np.random.default_rng(0)
    for i in range(3):
        save_observation(tmp_path / "rec" / f"obs_{i}", {"base_0_rgb": rng.integers(0, 256, (240, 320, 3), np.uint8)},
                         rng.uniform(-1, 1, 7), "stack the blocks")
    tok = demo_tokenizer(tmp_path / "tok")
    policy = Policy.load(tmp_path / "ckpt", tok, device="cuda", precision="fp8", calibration_data=tmp_path / "rec")
    saved = json.loads((tmp_path / "ckpt" / "pi05_ros_fp8_calibration.json").read_text())
    assert saved["observations"] == "recorded x3"
    chunk = policy.infer({"base_0_rgb": rng.integers(0, 256, (240, 320, 3), np.uint8)}, np.zeros(7), "stack", 3)
    assert np.isfinite(chunk.actions).all()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_rtc_on_the_fast_path_follows_the_reference(full_model, observation, reference, precision: str) -> None:
    """Real-time chunking: the fast path's guided steps (torch layers + their VJP, one CUDA graph per step)
    against the float32 reference's, same noise and previous chunk; beta = 0 is plain inference bit for bit.
    FP8 linears have no backward of their own: the VJP goes through their dequantized weights."""
    import dataclasses
    import time

    from pi05_ros.engine.rtc import Guidance

    pipe = Pi05Pipeline(full_model, precision=precision)
    plain, _ = pipe.run(observation, 10)
    other = dataclasses.replace(observation, noise=np.random.default_rng(9).standard_normal(
        observation.noise.shape).astype(np.float32))
    previous, _ = pipe.run(other, 10)  # a chunk that disagrees with this observation's own
    zero = dataclasses.replace(observation, guidance=Guidance.build(previous, 5, 30, 0.0))
    np.testing.assert_array_equal(pipe.run(zero, 10)[0], plain)  # beta 0: the plain path, bit for bit
    guided = dataclasses.replace(observation, guidance=Guidance.build(previous, 5, 30, 5.0, columns=7))
    want = reference_actions(full_model, guided, 10)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    got, timings = pipe.run(guided, 10)  # the first guided run captures its step graph
    torch.cuda.synchronize()
    extra_mb = (torch.cuda.memory_reserved() - reserved) / 2**20
    err = rel_err(got, want)
    committed = rel_err(got[:5, :7], previous[:5, :7])
    walls = []
    for obs in (observation, guided) * 20:
        start = time.perf_counter()
        pipe.run(obs, 10)
        walls.append((time.perf_counter() - start) * 1e3)
    plain_ms, rtc_ms = np.median(walls[0::2]), np.median(walls[1::2])
    print(f"RTC {precision} fast vs fp32 reference rel_l2 {err:.3e}; committed actions {committed:.3e} apart (plain "
          f"{rel_err(plain[:5, :7], previous[:5, :7]):.3e}); 10 steps e2e plain {plain_ms:.2f} ms, rtc {rtc_ms:.2f} "
          f"ms (denoise {timings['denoise']:.2f} ms, mode {pipe._rtc_mode}); reserved memory +{extra_mb:.0f} MB")
    assert err <= BOUND[precision]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("expert_kernels", ["auto", "on"])
def test_batch_buckets_equal_rows_alone(full_model, observation, precision: str, expert_kernels: str,
                                        record_property) -> None:
    """Batches of 1, 2, 3 (bucket 4) and 8 rows with their own prompt lengths and noise, through graphs per bucket
    (auto: the kernels up to 2 rows, the torch path from 4; on: the kernels every batch): each row as it is
    alone, within the precision's budget against the float32 reference too; the graphs are kept per bucket and
    reused."""
    cfg = full_model.cfg
    rng = np.random.default_rng(7)
    rows = []
    for length in (48, 20, 33, 64, 48, 7, 90, 48):
        mask = np.arange(cfg.max_token_len) < length
        tokens = np.where(mask, rng.integers(1, cfg.vocab_size, cfg.max_token_len), 0)
        images = [rng.integers(0, 256, im.shape, dtype=np.uint8) if im is not None else None
                  for im in observation.images]
        rows.append(PreparedObservation(images, tokens, mask, rng.standard_normal(observation.noise.shape)
                                        .astype(np.float32)))
    pipe = Pi05Pipeline(full_model, precision=precision, max_batch=8, expert_kernels=expert_kernels)
    assert pipe.path_for(8) == ("kernels" if expert_kernels == "on" else "torch")
    assert pipe.path_for(2) == "kernels"  # Hopper (the GPU tests' card): measured faster there at 2 rows
    alone = np.stack([pipe.run(row, 10)[0] for row in rows])
    reference = np.stack([reference_actions(full_model, row, 10) for row in rows])
    batched_three = None
    for count in (1, 2, 3, 8):
        batched, timings = pipe.run_batch(rows[:count], 10)
        if count == 3:
            batched_three = batched
        again, _ = pipe.run_batch(rows[:count], 10)
        np.testing.assert_array_equal(batched, again)  # graph replay is deterministic
        worst = max(rel_err(batched[i], alone[i]) for i in range(count))
        vs_reference = max(rel_err(batched[i], reference[i]) for i in range(count))
        print(f"BATCH {precision} {pipe.path_for(count)} rows={count} bucket={pipe.bucket(count)} vs_alone={worst:.3e} "
              f"vs_reference={vs_reference:.3e} denoise_ms={timings['denoise']:.2f} total_gpu_ms="
              f"{sum(v for k, v in timings.items() if k not in ('vision_per_view', 'denoise_step')):.2f}")
        # rows differ by bf16 roundings (a batch's GEMMs over more rows; with auto also another denoise path)
        assert worst < BOUND[precision]
        assert vs_reference < BOUND[precision]
        assert np.isfinite(batched).all()
    buckets = sorted({key[-1] for key in pipe._graphs if key[0] == "denoise_step"})
    assert buckets == [1, 2, 4, 8]
    before = len(pipe._graphs)
    pipe.run_batch(rows[3:8], 10)  # 5 rows: bucket 8, the same text tile as the 8 rows: nothing new captured
    assert len(pipe._graphs) == before
    # Nothing of the batches leaks into batch 1's state (caches, the step table's index, RoPE and mask buffers).
    np.testing.assert_array_equal(pipe.run(rows[0], 10)[0], alone[0])
    # Padded rows: 3 rows in bucket 4 after 4 other rows filled that bucket's fourth row.
    pipe.run_batch(rows[1:5], 10)
    np.testing.assert_array_equal(pipe.run_batch(rows[:3], 10)[0], pipe.run_batch(rows[:3], 10)[0])
    np.testing.assert_allclose(pipe.run_batch(rows[:3], 10)[0], batched_three, rtol=0, atol=0)
    # The same path without graphs (the same layers eagerly, the same FP8 scales): graphs change nothing but
    # cuBLAS run-to-run rounding (as the batch-1 graph test).
    eager = Pi05Pipeline(full_model, precision=precision, max_batch=8, use_graphs=False, expert_kernels=expert_kernels,
                         fp8_scales=pipe.fp8_scales if precision == "fp8" else None)
    assert [eager.path_for(b) for b in (2, 4)] == [pipe.path_for(b) for b in (2, 4)]  # each bucket on the same path
    for count in (2, 3):
        want = eager.run_batch(rows[:count], 10)[0]
        np.testing.assert_allclose(pipe.run_batch(rows[:count], 10)[0], want, rtol=0, atol=1e-3 * np.abs(want).max())
    # A bucket's first capture after a run of 100 steps on the same path (bucket 2's step table, whose index that
    # run left at its end).
    pipe.run_batch(rows[:2], 100)
    wide = [PreparedObservation([im, im, rows[0].images[0]], r.tokens, r.token_mask, r.noise)
            for r, im in zip(rows[:2], (rows[0].images[0], rows[1].images[0]), strict=True)]
    three_views, _ = pipe.run_batch(wide, 10)  # 3 views: a new vision / prefill / step graph for bucket 2
    assert np.isfinite(three_views).all()
    assert max(rel_err(three_views[i], pipe.run(wide[i], 10)[0]) for i in range(2)) < BOUND[precision]


@pytest.mark.parametrize("batch", [2, 4])
def test_lanes_at_once_equal_each_lane_alone(full_model, observation, batch: int) -> None:
    """Two lanes (Pi05Pipeline.lane: the same weights, their own buffers, graphs and capture streams) replayed at
    once from two threads, each on its own streams with the denoise at high priority (as tools/concurrent_lanes_gpu.py
    times them), give bit for bit what each gives alone. §48's lanes captured on torch's shared capture stream, so
    their graphs shared a cuBLAS workspace, and their actions differed under concurrency. Batch 2 runs the fused
    kernels (their workspaces per lane), batch 4 the torch path."""
    import threading

    rng = np.random.default_rng(batch)
    rows = [[PreparedObservation([rng.integers(0, 256, im.shape, dtype=np.uint8) if im is not None else None
                                  for im in observation.images], observation.tokens, observation.token_mask,
                                 rng.standard_normal(observation.noise.shape).astype(np.float32))
             for _ in range(batch)] for _ in range(2)]
    first = Pi05Pipeline(full_model, precision="fp8", max_batch=4)
    lanes = [first, first.lane()]
    alone = [lane.run_batch(lane_rows, 10)[0] for lane, lane_rows in zip(lanes, rows, strict=True)]
    for lane in lanes:
        lane.use_own_streams(denoise_priority=True)
    results: list[list[np.ndarray]] = [[], []]
    start = threading.Barrier(2)

    def loop(index: int) -> None:
        start.wait()
        for _ in range(20):
            results[index].append(lanes[index].run_batch(rows[index], 10)[0])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        assert len(results[index]) == 20
        for actions in results[index]:
            np.testing.assert_array_equal(actions, alone[index])
    # A capture in one lane while the other runs: a prompt in a text tile lane 1 has not seen makes its prefill graph
    # while lane 0 replays (thread_local capture: lane 0's synchronize calls meanwhile must not break it).
    def prompt_of(length: int) -> PreparedObservation:
        return PreparedObservation(rows[1][0].images, observation.tokens,
                                   np.arange(observation.tokens.size) < length, rows[1][0].noise)

    stop = threading.Event()
    busy: list[np.ndarray] = []

    def keep_busy() -> None:
        while not stop.is_set():
            busy.append(lanes[0].run_batch(rows[0], 10)[0])

    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        while not busy:  # lane 0 is running
            threading.Event().wait(0.001)
        captured = lanes[1].run_batch([prompt_of(100)] * batch, 10)[0]
    finally:
        stop.set()
        worker.join()
    assert busy and all(np.array_equal(actions, alone[0]) for actions in busy)
    # lane 0 makes the same tile's graphs alone: the same kernels on the same inputs (a capture that took in other
    # work would differ far beyond rounding)
    np.testing.assert_array_equal(lanes[0].run_batch([prompt_of(100)] * batch, 10)[0], captured)
    # Both lanes meet a new tile at once (a fleet's shared prompt): their graph making takes turns, both answer alike.
    together: list[np.ndarray | None] = [None, None]

    def first_use(index: int) -> None:
        start.wait()
        together[index] = lanes[index].run_batch([prompt_of(150)] * batch, 10)[0]

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(together[0], together[1])
    assert np.isfinite(together[0]).all()

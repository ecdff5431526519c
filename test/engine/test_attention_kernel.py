"""The flash-style attention kernel (engine/fast/kernels/attention.py) against the torch path's GEMM attention, on
the CPU through Triton's interpreter (float32: the interpreter garbles bf16 tensors). bf16 and speed: test/gpu."""

from __future__ import annotations

import pytest
import torch

from pi05_ros.engine.config import TINY
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast.blocks import ATTENTION, FastModel, _gqa_attention, denoise_eager, prefill_eager
from pi05_ros.engine.fast.kernels import attention as flash_module
from pi05_ros.engine.fast.kernels import available
from pi05_ros.engine.fast.kernels.attention import BLOCK_ROWS, KEY_BLOCK, KEY_WALKS, flash_gqa_attention, key_splits

pytestmark = pytest.mark.skipif(not available(torch.device("cpu")),
                                reason="needs Triton (its CPU interpreter runs these kernels)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(params=KEY_WALKS)
def walk(request, monkeypatch) -> str:
    """Each way the kernel walks its keys (all blocks, skipping masked blocks, the mask's runs): same results."""
    monkeypatch.setattr(flash_module, "KEY_WALK", request.param)
    return request.param


def case(batch: int, tokens: int, heads: int, keys: int, head_dim: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, head_dim, generator=gen)
    # the cache buffer is wider than the keys attended, as the pipeline's per-layer caches are
    k_cache = torch.randn(batch, 1, keys + 7, head_dim, generator=gen)
    v_cache = torch.randn(batch, 1, keys + 7, head_dim, generator=gen)
    return q, k_cache[:, :, :keys], v_cache[:, :, :keys]


@pytest.mark.parametrize("batch, tokens, heads, keys", [
    (1, 5, 8, 40),  # a small expert at batch 1: one query block, the keys split
    (3, 20, 4, 150),  # several query blocks (80 rows > 64), keys past a block boundary
    (2, 9, 2, 64),  # keys a whole number of blocks
])
def test_flash_matches_gemm_attention(batch: int, tokens: int, heads: int, keys: int, walk: str) -> None:
    q, k, v = case(batch, tokens, heads, keys)
    n_valid = torch.tensor([keys - 3 - 11 * i for i in range(batch)])
    horizon = 4  # the expert's mask: each row's valid prefix and the suffix's last rows
    idx = torch.arange(keys)
    key_mask = ((idx < n_valid.view(-1, 1)) | (idx >= keys - horizon)).view(batch, 1, 1, keys)
    out = flash_gqa_attention(q, k, v, key_mask)
    want = _gqa_attention(q, k, v, key_mask)
    assert out.shape == want.shape == (batch, tokens, heads * q.shape[-1])
    # float32 throughout: only summation order differs (online softmax over key blocks, then the splits)
    assert rel_err(out, want) < 1e-5


def test_head_dim_256_as_gemma_has_it(walk: str) -> None:
    """Gemma's head dim: the combine kernel merges the splits in four column blocks of 64."""
    q, k, v = case(1, 2, 8, 70, head_dim=256)
    key_mask = (torch.arange(70) < 61).view(1, 1, 1, 70)
    assert key_splits(1, 16, 70, programs=8)[0] > 1
    assert rel_err(flash_gqa_attention(q, k, v, key_mask), _gqa_attention(q, k, v, key_mask)) < 1e-5


def test_inputs_that_do_not_fit_are_refused() -> None:
    q, k, v = case(2, 3, 2, 40)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    with pytest.raises(ValueError, match="k must be"):
        flash_gqa_attention(q, k[:1], v[:1], mask)  # one row of K/V for two rows of queries
    with pytest.raises(ValueError, match="key_mask must be bool"):
        flash_gqa_attention(q, k, v, mask.int())
    with pytest.raises(ValueError, match="key_mask must be bool"):
        flash_gqa_attention(q, k, v, mask[..., :39])
    with pytest.raises(ValueError, match="one dtype"):
        flash_gqa_attention(q.double(), k, v, mask)


def test_one_mask_row_serves_every_batch_row_and_masked_keys_do_not_count(walk: str) -> None:
    q, k, v = case(2, 6, 4, 100)
    key_mask = (torch.arange(100) < 37).view(1, 1, 1, 100)
    out = flash_gqa_attention(q, k, v, key_mask)
    assert rel_err(out, _gqa_attention(q, k, v, key_mask)) < 1e-5
    # what the masked keys hold does not matter
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 37:] = 1e4
    v2[:, :, 37:] = float("nan")
    assert torch.equal(flash_gqa_attention(q, k2, v2, key_mask), out)


def test_split_and_unsplit_keys_agree(walk: str) -> None:
    """The combine kernel's merge of partial softmaxes equals one program's pass over all keys."""
    q, k, v = case(1, 4, 8, 300)
    key_mask = (torch.arange(300) < 290).view(1, 1, 1, 300)
    splits, _ = key_splits(1, 32, 300, programs=8)
    assert splits > 1  # the interpreter's program target splits the keys here
    split = flash_gqa_attention(q, k, v, key_mask)
    # 16 copies of the row are enough query programs for one split each
    assert key_splits(16, 32, 300, programs=8)[0] == 1
    whole = flash_gqa_attention(q.repeat(16, 1, 1, 1), k.repeat(16, 1, 1, 1), v.repeat(16, 1, 1, 1), key_mask)
    assert rel_err(whole[:1], split) < 1e-6  # float32: summation order only


@pytest.mark.parametrize("n_valid, tail", [
    (0, 4),  # no prefix key: the suffix alone
    (37, 0),  # a prefix alone (the prefill's mask)
    (91, 6),  # the runs meet inside one key block (100 - 6 = 94): that block is visited once
    (100, 0),  # every key valid
    (12, 60),  # a long trailing run over several blocks
])
def test_the_runs_walk_covers_every_key_of_both_runs_once(monkeypatch, n_valid: int, tail: int) -> None:
    """The runs walk visits the blocks of the mask's leading and trailing runs: each valid key exactly once, however
    the runs fall on block boundaries, with the keys split over several programs (the interpreter's target) or not.
    Its rows equal the GEMM attention's, and what the cache holds between the runs (NaN here) cannot reach them."""
    monkeypatch.setattr(flash_module, "KEY_WALK", "runs")
    q, k, v = case(2, 5, 8, 100, seed=3)
    idx = torch.arange(100)
    key_mask = ((idx < n_valid) | (idx >= 100 - tail)).view(1, 1, 1, 100)
    want = _gqa_attention(q, k, v, key_mask)
    k[:, :, ~key_mask.view(-1)] = float("nan")
    v[:, :, ~key_mask.view(-1)] = float("nan")
    assert key_splits(2, 40, 100, programs=8)[0] > 1 and key_splits(8, 40, 100, programs=8)[0] == 1
    for rows in (2, 8):  # 40 folded query rows a row: the keys split over 4 programs at 2 rows, not at 8
        reps = rows // 2
        out = flash_gqa_attention(q.repeat(reps, 1, 1, 1), k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1),
                                  key_mask)
        assert rel_err(out, want.repeat(reps, 1, 1)) < 1e-5  # float32: summation order only


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0/0, on purpose
def test_the_runs_walk_gives_nan_for_a_mask_outside_its_contract(monkeypatch) -> None:
    """A valid key between the leading and the trailing run would be missed by the runs walk: the row's output is
    NaN (loud), never a softmax quietly missing a key. A row whose keys are all masked is NaN on every walk, as the
    GEMM attention's softmax is."""
    monkeypatch.setattr(flash_module, "KEY_WALK", "runs")
    q, k, v = case(2, 3, 4, 80, seed=4)
    idx = torch.arange(80)
    holes = torch.stack([(idx < 30) | (idx == 50) | (idx >= 75),  # a stray valid key between the runs
                         (idx < 30) | (idx >= 75)])  # the contract's shape
    for reps in (1, 4):  # the keys split over programs (2 rows), and not (8 rows)
        out = flash_gqa_attention(q.repeat(reps, 1, 1, 1), k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1),
                                  holes.repeat(reps, 1).view(2 * reps, 1, 1, 80))
        assert torch.isnan(out[0::2]).all()
        assert rel_err(out[1:2], _gqa_attention(q[1:], k[1:], v[1:], holes[1:].view(1, 1, 1, 80))) < 1e-5
    nothing = torch.zeros(1, 1, 1, 80, dtype=torch.bool)
    for walk in KEY_WALKS:
        monkeypatch.setattr(flash_module, "KEY_WALK", walk)
        assert torch.isnan(flash_gqa_attention(q, k, v, nothing)).all(), walk


def test_each_device_gets_its_measured_walk_unless_one_is_forced(monkeypatch) -> None:
    """key_walk: "runs" on Hopper (measured faster, docs/benchmarks.md §70), "skip" elsewhere (the runs walk's
    128 KiB of shared memory does not fit Ada; nothing else measured); KEY_WALK, where set, forces its walk."""
    monkeypatch.setattr(flash_module, "KEY_WALK", None)
    cuda = torch.device("cuda", 0)
    from pi05_ros.engine.fast import kernels

    for major, walk in ((9, "runs"), (8, "skip"), (10, "skip"), (12, "skip")):
        monkeypatch.setattr(flash_module, "capability_major", lambda device, major=major: major)
        assert flash_module.key_walk(cuda) == walk, major
        # the one rule of "measured here" the pipeline's defaults follow too (pipeline.kernels_measured)
        monkeypatch.setattr(kernels, "capability_major", lambda device, major=major: major)
        assert kernels.measured_on(cuda) == (walk == "runs"), major
    assert flash_module.key_walk(torch.device("cpu")) == "skip"
    assert not kernels.measured_on(torch.device("cpu"))
    monkeypatch.setattr(flash_module, "KEY_WALK", "all")
    assert flash_module.key_walk(cuda) == flash_module.key_walk(torch.device("cpu")) == "all"


def test_the_measured_rule_reads_each_gpus_own_capability(monkeypatch) -> None:
    """kernels.capability_major: a device without an index is the current one, and each GPU's answer is its own
    (looked up once per GPU): on a host with an H100 as cuda:1 and an Ada card as cuda:0, only cuda:1 takes the
    measured defaults (pipeline.kernels_measured) and the runs walk."""
    from pi05_ros.engine.fast import kernels, pipeline

    asked: list[int] = []

    def capability(index: int) -> tuple[int, int]:
        asked.append(index)
        return (9, 0) if index == 1 else (8, 9)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(flash_module, "KEY_WALK", None)
    kernels._capability_major.cache_clear()
    try:
        assert kernels.capability_major(torch.device("cuda")) == 9  # no index: the current device, 1
        assert kernels.capability_major(torch.device("cuda", 0)) == 8
        assert pipeline.kernels_measured(torch.device("cuda", 1)) and not pipeline.kernels_measured(
            torch.device("cuda", 0))
        assert flash_module.key_walk(torch.device("cuda", 1)) == "runs"
        assert flash_module.key_walk(torch.device("cuda", 0)) == "skip"
        assert sorted(set(asked)) == [0, 1] and len(asked) == 2  # once per GPU
    finally:
        kernels._capability_major.cache_clear()  # nothing patched stays cached for the tests after


def test_key_splits_fill_the_gpu_and_never_leave_a_split_empty() -> None:
    blocks = -(-610 // KEY_BLOCK)
    for batch, rows in ((1, 400), (8, 400), (1, 4480), (8, 4480)):
        splits, per_split = key_splits(batch, rows, 610, programs=264)
        assert 1 <= splits <= blocks and (splits - 1) * per_split < blocks <= splits * per_split
        query_programs = batch * -(-rows // BLOCK_ROWS)
        # enough programs for two per SM of 132, where the keys allow it
        assert query_programs * splits >= min(264, query_programs * blocks) or splits == blocks
    assert key_splits(8, 4480, 610, programs=264)[0] == 1  # the batched prefill: query blocks alone fill the GPU


def test_fast_model_with_flash_attention_matches_gemm_attention() -> None:
    """Prefill and denoise through FastModel(attention="flash") against "gemm", float32 on the tiny model."""
    model = random_model(TINY, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    rows = model.embed_tokens[torch.randint(0, 1000, (9,), generator=gen)]
    noise = torch.randn(TINY.action_horizon, TINY.action_dim, generator=gen)
    results = {}
    for attention in ("gemm", "flash"):
        fast = FastModel(model, torch.float32, attention=attention)
        prefix = prefill_eager(fast, images, rows)
        results[attention] = (prefix.keys[-1].clone(), denoise_eager(fast, prefix, noise, num_steps=3))
    assert "flash" in ATTENTION
    # the last prefix layer's K/V come after the first layer's attention; the actions after 3 x 2 expert layers.
    # float32: summation order only
    assert rel_err(results["flash"][0], results["gemm"][0]) < 1e-5
    assert rel_err(results["flash"][1], results["gemm"][1]) < 1e-5


def test_the_pipeline_takes_the_kernel_for_batched_prefills_only_where_measured(monkeypatch) -> None:
    """attention="auto": the flash kernel for prefill buckets of FLASH_PREFILL_MIN_BATCH+ rows on Hopper, the GEMM
    attention for batch 1, the denoise loop and other GPUs; explicit choices apply to both stacks; a bad choice or
    "flash" where Triton cannot run is refused. Real pipelines (no graphs) on the tiny model."""
    from pi05_ros.engine.fast import kernels, pipeline

    model = random_model(TINY, seed=0, device=torch.device("cpu"), dtype=torch.bfloat16)
    options = {"precision": "bf16", "use_graphs": False, "compile": False, "expert_kernels": "off", "max_batch": 4}
    auto = pipeline.Pi05Pipeline(model, **options)
    assert auto.attention == "auto" and auto.fast.expert_attention == "gemm"
    assert [auto.prefill_attention(b) for b in (1, 2, 4)] == ["gemm"] * 3  # not Hopper: no kernel
    monkeypatch.setattr(pipeline, "kernels_measured", lambda device: True)  # as on Hopper
    assert auto.prefill_attention(1) == "gemm"
    assert auto.prefill_attention(pipeline.FLASH_PREFILL_MIN_BATCH) == "flash"
    assert auto.prefill_attention(4) == "flash"
    gemm = pipeline.Pi05Pipeline(model, attention="gemm", **options)
    assert gemm.prefill_attention(4) == "gemm" and gemm.fast.expert_attention == "gemm"
    flash = pipeline.Pi05Pipeline(model, attention="flash", **options)
    assert flash.prefill_attention(1) == "flash" and flash.fast.expert_attention == "flash"
    with pytest.raises(ValueError, match="attention must be"):
        pipeline.Pi05Pipeline(model, attention="fast", **options)
    monkeypatch.setattr(kernels, "available", lambda device: False)  # no Triton here
    with pytest.raises(ValueError, match="needs Triton"):
        pipeline.Pi05Pipeline(model, attention="flash", **options)
    assert auto.prefill_attention(4) == "gemm"


def test_real_time_chunking_runs_with_flash_attention_through_the_gemm_path() -> None:
    """The kernel has no backward: guided steps (autograd through the expert) take the GEMM attention even when
    the model runs "flash", and follow the "gemm" model's guided steps."""
    from pi05_ros.engine.reference import euler_schedule

    model = random_model(TINY, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    rows = model.embed_tokens[torch.randint(0, 1000, (9,), generator=gen)]
    noise = torch.randn(1, TINY.action_horizon, TINY.action_dim, generator=gen)
    previous = torch.randn(1, TINY.action_horizon, TINY.action_dim, generator=gen)
    weights = torch.linspace(1, 0, TINY.action_horizon).view(1, -1, 1).expand_as(previous).contiguous()
    results = {}
    for attention in ("gemm", "flash"):
        fast = FastModel(model, torch.float32, attention=attention)
        prefix = prefill_eager(fast, images, rows)
        mods, final, out_w, out_b = fast.step_schedule(3)
        x = noise.clone()
        for step, (t, dt) in enumerate(euler_schedule(3)):
            fast.guided_step(x, prefix.n_valid, prefix.keys, prefix.values, mods[step], final[step], out_w, out_b,
                             t, dt, previous, weights, 5.0, compiled=False)
        results[attention] = x
    assert rel_err(results["flash"], results["gemm"]) < 1e-5  # float32; only the prefill's summation order differs

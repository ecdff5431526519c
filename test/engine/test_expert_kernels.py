"""The fused expert kernels (engine/fast/kernels/expert.py) against their torch definition and openpi's golden
outputs, on the CPU through Triton's interpreter. Their speed and the bf16 path are tested on the GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pi05_ros.engine.config import PRESETS, TINY, GemmaConfig
from pi05_ros.engine.demo import random_model
from pi05_ros.engine.fast.blocks import FastModel, denoise_eager, prefill_eager, prefill_eager_batch
from pi05_ros.engine.fast.kernels import available
from pi05_ros.engine.fast.kernels.expert import (
    EPI_GEGLU,
    EPI_QKV,
    EPI_RESIDUAL,
    BatchShape,
    ExpertKernels,
    GemmConfig,
    KernelConfig,
    expert_layer_torch,
    fit_config,
    gemm_configs,
    launch_shape,
    layer_weights_torch,
    pack_linear,
    shared_bytes,
    unpack_weight,
)

pytestmark = pytest.mark.skipif(not available(torch.device("cpu")),
                                reason="needs Triton (its CPU interpreter runs these kernels)")

# A small expert whose shapes exercise every path: several pair tiles per head, K split in 2+ programs,
# a K loop inside a program, 10 rows padded to 16, and attention key splits that run past the keys.
SMALL = TINY.replace(
    expert=GemmaConfig(width=128, depth=2, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=64),
    vlm=GemmaConfig(width=96, depth=2, mlp_dim=192, num_heads=2, num_kv_heads=1, head_dim=64),
)
SPLIT = KernelConfig(qkv=GemmConfig(32, 64, k_step=32), o=GemmConfig(32, 64), gate_up=GemmConfig(64, 64, k_step=32),
                     down=GemmConfig(32, 128, k_step=64, prefetch=False), key_block=16, key_splits=3,
                     fused_step_in=False)
WHOLE_K = KernelConfig(qkv=GemmConfig(32, 128, k_step=32), o=GemmConfig(32, 128, k_step=64),
                       gate_up=GemmConfig(64, 128, k_step=32), down=GemmConfig(32, 256, k_step=64),
                       key_block=32, key_splits=5)
# SPLIT with the step's input in one kernel (the default).
FUSED = dataclasses.replace(SPLIT, fused_step_in=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def small():
    model = random_model(SMALL, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    fast = FastModel(model, torch.float32)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    rows = model.embed_tokens[torch.randint(0, 1000, (9,), generator=gen)]
    prefix = prefill_eager(fast, images, rows)
    noise = torch.randn(SMALL.action_horizon, SMALL.action_dim, generator=gen)
    return fast, prefix, noise


@pytest.mark.parametrize("kind", [EPI_QKV, EPI_GEGLU, EPI_RESIDUAL])
@pytest.mark.parametrize("fp8", [False, True])
def test_packing_round_trips(kind: int, fp8: bool) -> None:
    n, k = {EPI_QKV: (4 * 64, 96), EPI_GEGLU: (2 * 96, 48), EPI_RESIDUAL: (48, 96)}[kind]
    w = torch.randn(n, k)
    cfg = fit_config(GemmConfig(64, 64), {EPI_QKV: 32, EPI_GEGLU: 96, EPI_RESIDUAL: None}[kind], k)
    packed = pack_linear(w, kind, cfg, head_dim=64, mlp=96, fp8=fp8)
    back = unpack_weight(packed, kind, head_dim=64, mlp=96)
    # exact for float32 weights; e4m3's 3-bit mantissa rounds by at most 2^-4 of each column's scale
    tol = 0.0 if not fp8 else 2**-4
    assert (back - w).abs().max() <= tol * w.abs().amax(dim=1, keepdim=True).max() + 1e-12


def test_a_tile_pairs_rope_partners_and_geglu_partners() -> None:
    from pi05_ros.engine.fast.kernels.expert import paired_columns

    # RoPE rotates column j with j + head_dim/2 of the same head; GeGLU multiplies gate j with up j
    # head_dim 64: 2 tiles of 16 pairs per head, so tile 5 is the second tile of head 2
    assert paired_columns(EPI_QKV, 5, 16, head_dim=64, mlp=0) == [*range(144, 160), *range(176, 192)]
    assert paired_columns(EPI_GEGLU, 2, 16, head_dim=0, mlp=96) == [*range(32, 48), *range(128, 144)]


@pytest.mark.parametrize("config", [SPLIT, WHOLE_K, FUSED], ids=["split-k", "whole-k", "fused-step-in"])
def test_layer_equals_its_torch_definition(small, config: KernelConfig) -> None:
    fast, prefix, _ = small
    kernels = ExpertKernels(fast, config)
    sched = kernels.schedule(fast.step_schedule(3))
    x = torch.randn(SMALL.action_horizon, SMALL.expert.width, generator=torch.Generator().manual_seed(1))
    k_kern, v_kern = prefix.keys[0][0, 0].clone(), prefix.values[0][0, 0].clone()
    k_ref, v_ref = k_kern.clone(), v_kern.clone()
    out = x.clone()
    ssp = kernels.modulate(out, sched[0][1, 0, 0])
    kernels.layer(out, 0, sched[0][1, 0], None, sched[4][1, 0], sched[5][1, 0], k_kern, v_kern, prefix.n_valid, ssp)
    ref = expert_layer_torch(x, sched[0][1, 0], sched[4][1, 0], sched[5][1, 0], *layer_weights_torch(kernels, 0),
                             k_ref, v_ref, int(prefix.n_valid), fast.rope_cos, fast.rope_sin, kernels.heads,
                             kernels.head_dim, kernels.eps, torch.float32)
    # float32 throughout; only summation order differs: ~1e-7 measured
    assert rel_err(out, ref) < 1e-5
    assert rel_err(k_kern, k_ref) < 1e-5 and rel_err(v_kern, v_ref) < 1e-5  # the suffix's K/V rows
    assert torch.equal(k_kern[: int(prefix.n_valid)], prefix.keys[0][0, 0, : int(prefix.n_valid)])  # prefix kept
    for _, count in kernels.ws.values():
        assert not count.any()  # every split-K counter is reset for the next layer


@pytest.mark.parametrize("config", [SPLIT, WHOLE_K], ids=["16-key-blocks", "32-key-blocks"])
@pytest.mark.parametrize("room", [3, 40, 300])
def test_a_layer_ignores_the_caches_room_whatever_it_holds(small, config: KernelConfig, room: int) -> None:
    """The cache has room for longer prompts between a row's prefix and its suffix. Filled with NaN here, it must
    not reach the layer's output (masked V rows read as 0) nor be written. With 3 rows of room the prefix's last
    block and the suffix's first are one block. Which blocks are read is tested below, through the partials."""
    fast, prefix, _ = small
    kernels = ExpertKernels(fast, config)
    sched = kernels.schedule(fast.step_schedule(3))
    n_valid = int(prefix.n_valid)
    horizon = SMALL.action_horizon
    k_prefix, v_prefix = (c[0, 0, :n_valid] for c in (prefix.keys[0], prefix.values[0]))

    def cache(prefix_rows: torch.Tensor, fill: float) -> torch.Tensor:
        rows = torch.full((n_valid + room + horizon, prefix_rows.shape[-1]), fill)
        rows[:n_valid] = prefix_rows
        return rows

    k_kern, v_kern = cache(k_prefix, float("nan")), cache(v_prefix, float("nan"))
    k_ref, v_ref = cache(k_prefix, 0.0), cache(v_prefix, 0.0)
    x = torch.randn(horizon, SMALL.expert.width, generator=torch.Generator().manual_seed(5))
    out = x.clone()
    ssp = kernels.modulate(out, sched[0][1, 0, 0])
    kernels.layer(out, 0, sched[0][1, 0], None, sched[4][1, 0], sched[5][1, 0], k_kern, v_kern, prefix.n_valid, ssp)
    ref = expert_layer_torch(x, sched[0][1, 0], sched[4][1, 0], sched[5][1, 0], *layer_weights_torch(kernels, 0),
                             k_ref, v_ref, n_valid, fast.rope_cos, fast.rope_sin, kernels.heads, kernels.head_dim,
                             kernels.eps, torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5  # float32: summation order only
    assert k_kern[n_valid:n_valid + room].isnan().all()  # the room stays untouched


def valid_block_schedule(n_valid: int, keys_total: int, horizon: int, block: int, splits: int) -> list[list[int]]:
    """The key blocks each split should read: the blocks holding a valid key (the prefix's first n_valid keys, the
    last `horizon`), each once, in order, shared out `ceil(count / splits)` to a split."""
    valid = sorted({k // block for k in range(keys_total) if k < n_valid or k >= keys_total - horizon})
    per_split = -(-len(valid) // splits)
    return [valid[s * per_split:(s + 1) * per_split] for s in range(splits)]


@pytest.mark.parametrize("splits", [3, 5, 8])
@pytest.mark.parametrize(("n_valid", "room", "horizon"), [(521, 300, 10), (512, 37, 10), (513, 0, 10),
                                                          (64, 100, 16), (100, 5, 3)])
def test_the_key_splits_share_out_only_the_blocks_holding_valid_keys(small, splits: int, n_valid: int, room: int,
                                                                     horizon: int) -> None:
    """Masked keys add nothing to a softmax, so an output cannot show which blocks were read; each split's partial
    maximum can: it is the largest score over exactly the keys of its blocks (-inf for a split given none). Every
    partial buffer starts as NaN, so a split that wrote nothing would show too. Geometries: room that is most of
    the cache, room inside one block, none, a suffix of a whole block's length across two blocks, a block-aligned
    prefix. (The horizon stays within the small model's 16 query rows.)"""
    fast, _, _ = small
    block = 16
    kernels = ExpertKernels(fast, dataclasses.replace(SPLIT, key_splits=splits, key_block=block))
    assert horizon <= kernels.block_rows
    kernels.horizon = horizon  # the attention reads its query rows and suffix length from here
    gen = torch.Generator().manual_seed(n_valid + room)
    keys_total, d, heads = n_valid + room + horizon, kernels.head_dim, kernels.heads
    k = torch.randn(1, keys_total, d, generator=gen)
    v = torch.randn(1, keys_total, d, generator=gen)
    k[0, n_valid:keys_total - horizon] = float("nan")  # the room
    v[0, n_valid:keys_total - horizon] = float("nan")
    kernels.q.copy_(torch.randn(kernels.q.shape, generator=gen))
    for buf in (kernels.part_m, kernels.part_l, kernels.part_acc):
        buf.fill_(float("nan"))
    kernels._attention(1, k, v, torch.tensor([n_valid]))

    q = kernels.q[0, :, :horizon].float()  # [heads, rows, d]
    scores = torch.einsum("hrd,kd->hrk", q, torch.nan_to_num(k[0])) * d**-0.5
    got = kernels.part_m.view(heads, splits, -1)[:, :, :horizon]
    for split, blocks in enumerate(valid_block_schedule(n_valid, keys_total, horizon, block, splits)):
        keys = [key for b in blocks for key in range(b * block, min((b + 1) * block, keys_total))
                if key < n_valid or key >= keys_total - horizon]
        want = scores[..., keys].amax(-1) if keys else torch.full((heads, horizon), float("-inf"))
        assert torch.allclose(got[:, split], want, atol=1e-5, rtol=1e-5), f"split {split}: blocks {blocks}"
    mask = (torch.arange(keys_total) < n_valid) | (torch.arange(keys_total) >= keys_total - horizon)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want = torch.einsum("hrk,kd->rhd", probs, torch.nan_to_num(v[0])).reshape(horizon, heads * d)
    assert rel_err(kernels.attn[0, :horizon], want) < 1e-5  # float32


def test_torch_definition_equals_the_fast_path_layer(small) -> None:
    """The factored adaRMS (scale before the GEMM, row factor and shift after) is the same function."""
    from pi05_ros.engine.fast.blocks import expert_layer

    fast, prefix, _ = small
    kernels = ExpertKernels(fast, SPLIT)
    sched = kernels.schedule(fast.step_schedule(3))
    x = torch.randn(SMALL.action_horizon, SMALL.expert.width, generator=torch.Generator().manual_seed(2))
    keys = [prefix.keys[0].clone(), prefix.values[0].clone()]
    positions = prefix.n_valid + torch.arange(SMALL.action_horizon)
    total = keys[0].shape[2]
    idx = torch.arange(total)
    mask = ((idx < prefix.n_valid) | (idx >= total - SMALL.action_horizon)).view(1, 1, 1, total)
    block = fast.expert_blocks[0]
    want = expert_layer(x[None], sched[0][1, 0], fast.rope_cos[positions], fast.rope_sin[positions], mask, *keys,
                        *block.args())[0]
    got = expert_layer_torch(x, sched[0][1, 0], sched[4][1, 0], sched[5][1, 0], *layer_weights_torch(kernels, 0),
                             prefix.keys[0][0, 0].clone(), prefix.values[0][0, 0].clone(), int(prefix.n_valid),
                             fast.rope_cos, fast.rope_sin, kernels.heads, kernels.head_dim, kernels.eps, torch.float32)
    assert rel_err(got, want) < 1e-5  # float32: products reordered only


@pytest.mark.parametrize("config", [SPLIT, WHOLE_K, FUSED], ids=["split-k", "whole-k", "fused-step-in"])
def test_denoise_equals_the_fast_path(small, config: KernelConfig) -> None:
    fast, prefix, noise = small
    want = denoise_eager(fast, prefix, noise, 3)
    kernels = ExpertKernels(fast, config)
    x = noise.clone()[None]
    keys = [k.clone() for k in prefix.keys]
    values = [v.clone() for v in prefix.values]
    kernels.denoise(x, prefix.n_valid, keys, values, kernels.schedule(fast.step_schedule(3)))
    assert rel_err(x[0], want) < 1e-5  # float32: ~1.2e-7 measured
    again = noise.clone()[None]
    kernels.denoise(again, prefix.n_valid, keys, values, kernels.schedule(fast.step_schedule(3)))
    assert torch.equal(again, x)  # fixed-order split-K sums: deterministic


def test_half_precision_and_fp8_weights_stay_close(small) -> None:
    fast, prefix, noise = small
    want = denoise_eager(fast, prefix, noise, 3)
    for dtype, fp8, budget in ((torch.float16, (), 1e-3), (torch.float32, ("qkv", "o", "gate_up", "down"), 3e-2)):
        kernels = ExpertKernels(fast, SPLIT, fp8=fp8, compute_dtype=dtype)
        x = noise.clone()[None]
        kernels.denoise(x, prefix.n_valid, [k.to(dtype) for k in prefix.keys], [v.to(dtype) for v in prefix.values],
                        kernels.schedule(fast.step_schedule(3)))
        # fp16 GEMM inputs ~6e-5 measured; FP8 e4m3 weights (per-column scales) ~6e-3 measured
        assert rel_err(x[0], want) < budget, (dtype, fp8)


@pytest.mark.parametrize("steps", [1, 10])
def test_golden_model_on_the_kernels_matches_openpi(golden_model, golden_cases, fast_case, steps: int) -> None:
    fast = FastModel(golden_model, torch.float32)
    images, rows, noise = fast_case(0)
    prefix = prefill_eager(fast, images, rows)
    # the GPU's tile shapes, fitted to the tiny model
    kernels = ExpertKernels(fast, KernelConfig())
    x = noise.clone()[None]
    kernels.denoise(x, prefix.n_valid, prefix.keys, prefix.values, kernels.schedule(fast.step_schedule(steps)))
    # float32 throughout: the reference itself is ~2e-7 from openpi
    assert rel_err(x[0], golden_cases[f"case0/actions_steps{steps}"][0]) < 1e-5



@pytest.fixture(scope="module")
def small_batch(small):
    """Three rows with their own images, prompt lengths (9, 3 and 20 text rows: n_valid differs, and the 20 pad
    every row's text to 32) and noise, prefilled together into caches of one size."""
    fast, _, _ = small
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 255, (3, 2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    text = [torch.randn(n, SMALL.vlm.width, generator=gen) for n in (9, 3, 20)]
    prefix = prefill_eager_batch(fast, images, text)
    noise = torch.randn(3, SMALL.action_horizon, SMALL.action_dim, generator=gen)
    return prefix, noise


# Batch shapes: a row and a tile per program (as batch 1), the default 2 x 1, 2 x 2, and 4 x 4 (4 rows for a batch
# of 3: a masked row; 4 tiles where a GEMM has them, 2 for qkv, whose epilogue needs one head's tiles: 2 here).
BATCHED = {
    "one-row-one-tile": dataclasses.replace(SPLIT, batch_rows=1, batch_tiles=1),
    "default-shape": SPLIT,
    "2-rows-2-tiles": dataclasses.replace(SPLIT, batch_tiles=2),
    "4-rows-4-tiles-fused-step-in": dataclasses.replace(FUSED, batch_rows=4, batch_tiles=4, batch_warps=4),
    # every GEMM over its whole K in one program (SPLIT packs each in 2 chunks), 16 of K an iteration
    "whole-k-short-step": dataclasses.replace(SPLIT, batch_tiles=2, batch_split_k=False, batch_k_step=16),
    # each GEMM its own shape (a row and 2 tiles for qkv, 4 rows with split K for o: a workspace for 4 row slots,
    # 2 x 2 over the whole K for gate_up, 2 rows x 1 tile for down) and the attention its own key splits
    "per-gemm-shapes": dataclasses.replace(SPLIT, batch_key_splits=2, batch_gemms=(
        ("qkv", BatchShape(1, 2, 4, 2, 16)), ("o", BatchShape(4, 1, 4, 2)),
        ("gate_up", BatchShape(2, 2, 8, 3, 32, False)), ("down", BatchShape(2, 1, 4, 2, 32)))),
}


@pytest.mark.parametrize("config", BATCHED.values(), ids=BATCHED.keys())
def test_a_batch_on_the_kernels_equals_its_rows_alone_and_the_fast_path(small, small_batch,
                                                                         config: KernelConfig) -> None:
    fast, _, _ = small
    prefix, noise = small_batch
    assert len(set(prefix.n_valid.tolist())) == 3  # each row its own prompt length: positions and key masks differ
    schedule = fast.step_schedule(3)
    want = denoise_eager(fast, prefix, noise, 3)  # the torch path's batch
    kernels = ExpertKernels(fast, config, max_batch=4)
    sched = kernels.schedule(schedule)
    keys = [k.clone() for k in prefix.keys]
    values = [v.clone() for v in prefix.values]
    x = noise.clone()
    kernels.denoise(x, prefix.n_valid, keys, values, sched)
    assert rel_err(x, want) < 1e-5  # float32: summation order only
    for _, count in kernels.ws.values():
        assert not count.any()  # every (row, tile) split-K counter is reset
    for row in range(3):
        alone = noise[row:row + 1].clone()
        row_keys = [k[row:row + 1].clone() for k in prefix.keys]
        row_values = [v[row:row + 1].clone() for v in prefix.values]
        kernels.denoise(alone, prefix.n_valid[row:row + 1], row_keys, row_values, sched)
        # the kernels compute a row alike batched or not (the next test); the step's ends are torch GEMMs, which
        # the CPU blocks differently for 1 and 3 rows: float32 rounding only
        assert rel_err(alone[0], x[row]) < 1e-6
        assert rel_err(row_keys[-1][0, 0], keys[-1][row, 0]) < 1e-6  # and its cache's suffix rows


def test_the_kernels_refuse_a_batch_larger_than_they_were_built_for(small, small_batch) -> None:
    fast, _, _ = small
    prefix, noise = small_batch
    kernels = ExpertKernels(fast, SPLIT, max_batch=2)
    with pytest.raises(ValueError, match="a batch of 3 rows; these kernels were built for 1..2"):
        kernels.denoise(noise.clone(), prefix.n_valid, prefix.keys, prefix.values,
                        kernels.schedule(fast.step_schedule(1)))


@pytest.mark.parametrize("config", [BATCHED["one-row-one-tile"], BATCHED["2-rows-2-tiles"]],
                         ids=["one-row-one-tile", "2-rows-2-tiles"])
def test_a_layer_on_a_batch_computes_each_row_as_alone(small, small_batch, config: KernelConfig) -> None:
    fast, _, _ = small
    prefix, _ = small_batch
    kernels = ExpertKernels(fast, config, max_batch=3)
    shapes = {kernels.launch_shape(p, kind, 3)[:2] for p, kind in
              zip(vars(kernels.layers[0]).values(), (EPI_QKV, EPI_RESIDUAL, EPI_GEGLU, EPI_RESIDUAL), strict=True)}
    assert shapes == ({(1, 1)} if config.batch_rows == 1 else {(2, 2)})
    sched = kernels.schedule(fast.step_schedule(3))
    mods = sched[0][1]
    x = torch.randn(3, SMALL.action_horizon, SMALL.expert.width, generator=torch.Generator().manual_seed(4))
    keys, values = prefix.keys[1][:, 0].clone(), prefix.values[1][:, 0].clone()
    batch = x.clone()
    ssp = kernels.modulate(batch, mods[0, 0])
    kernels.layer(batch, 0, mods[0], mods[1, 0], sched[4][1, 0], sched[5][1, 0], keys, values, prefix.n_valid, ssp)
    for row in range(3):
        alone = x[row].clone()
        row_keys, row_values = prefix.keys[1][row, 0].clone(), prefix.values[1][row, 0].clone()
        ssp = kernels.modulate(alone, mods[0, 0])
        kernels.layer(alone, 0, mods[0], mods[1, 0], sched[4][1, 0], sched[5][1, 0], row_keys, row_values,
                      prefix.n_valid[row], ssp)
        if config.batch_rows == 1:
            # one program per (row, tile): the same instructions on the same data, batched or not
            assert torch.equal(alone, batch[row])
            assert torch.equal(row_keys, keys[row]) and torch.equal(row_values, values[row])
        else:  # wider programs: products summed alike, but the numpy dot may block other shapes differently
            assert rel_err(alone, batch[row]) < 1e-6
            assert rel_err(row_keys, keys[row]) < 1e-6 and rel_err(row_values, values[row]) < 1e-6


def prepared_rows(seed: int, lengths: tuple[int, ...], views: int) -> list:
    """PreparedObservations for SMALL, as a runner gets them: `views` random images, prompts of `lengths` tokens,
    random noise."""
    import numpy as np

    from pi05_ros.engine.runner import PreparedObservation

    rng = np.random.default_rng(seed)
    size, max_len = SMALL.vision.image_size, SMALL.max_token_len
    rows = []
    for length in lengths:
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(views)]
        images += [None] * (len(SMALL.image_keys) - views)
        tokens = np.zeros(max_len, np.int64)
        tokens[:length] = rng.integers(1, SMALL.vocab_size, length)
        noise = rng.standard_normal((SMALL.action_horizon, SMALL.action_dim)).astype(np.float32)
        rows.append(PreparedObservation(images, tokens, np.arange(max_len) < length, noise))
    return rows


def test_the_pipelines_batches_run_on_the_kernels_with_expert_kernels_on(small) -> None:
    """Pi05Pipeline(expert_kernels="on") denoises batches on the kernels (staging, batch caches, n_valid per row,
    the step table: as on a GPU, without graphs)."""
    import numpy as np

    from pi05_ros.engine.fast.pipeline import Pi05Pipeline

    fast, _, _ = small
    rows = prepared_rows(5, (5, 12, 3), views=2)
    options = dict(precision="bf16", use_graphs=False, compile=False, max_batch=4, text_tile=8)
    on_kernels = Pi05Pipeline(fast, expert_kernels="on", **options)  # fast is float32: the interpreter's dtype
    assert [on_kernels.path_for(b) for b in (1, 3)] == ["kernels", "kernels"]
    batched, _ = on_kernels.run_batch(rows, 3)  # bucket 4: a padded fourth row
    torch_path = Pi05Pipeline(fast, expert_kernels="off", **options)
    want, _ = torch_path.run_batch(rows, 3)
    assert rel_err(torch.from_numpy(batched), torch.from_numpy(want)) < 1e-5  # float32 both: summation order only
    for row, obs in enumerate(rows):
        alone, _ = on_kernels.run(obs, 3)  # batch 1: its own caches and graphs
        assert rel_err(torch.from_numpy(alone), torch.from_numpy(batched[row])) < 1e-6  # the step's torch ends
    assert not np.allclose(batched[0], batched[1])


def test_auto_denoises_the_batches_measured_faster_on_the_kernels(small, monkeypatch) -> None:
    """expert_kernels="auto" where the kernels were measured (Hopper; here the device check says so): batches up to
    AUTO_KERNEL_MAX_BATCH rows on the kernels, larger ones on the torch path, and the kernels sized for no more."""
    from pi05_ros.engine.fast import pipeline
    from pi05_ros.engine.fast.pipeline import AUTO_KERNEL_MAX_BATCH, Pi05Pipeline

    fast, _, _ = small
    options = dict(precision="bf16", use_graphs=False, compile=False, max_batch=8, text_tile=8)
    assert Pi05Pipeline(fast, expert_kernels="auto", **options).expert_kernels is None  # the CPU: not measured
    monkeypatch.setattr(pipeline, "kernels_measured", lambda device: True)
    auto = Pi05Pipeline(fast, expert_kernels="auto", **options)
    assert AUTO_KERNEL_MAX_BATCH == 2
    assert [auto.path_for(b) for b in (1, 2, 4, 8)] == ["kernels", "kernels", "torch", "torch"]
    assert auto.expert_kernels.max_batch == 2
    rows = prepared_rows(6, (5, 12), views=2)
    steps_on_kernels = []
    real_step = auto.expert_kernels.denoise_step
    monkeypatch.setattr(auto.expert_kernels, "denoise_step",
                        lambda x, *args: steps_on_kernels.append(x.shape[0]) or real_step(x, *args))
    batched, _ = auto.run_batch(rows, 3)  # bucket 2, on the kernels
    assert steps_on_kernels == [2, 2, 2]  # 3 steps, each of the 2 rows at once
    want, _ = Pi05Pipeline(fast, expert_kernels="off", **options).run_batch(rows, 3)
    assert rel_err(torch.from_numpy(batched), torch.from_numpy(want)) < 1e-5  # float32 both: summation order only


# What Triton 3.6 reported on an H100 (232448 bytes a program) when a batch shape failed to launch, the kernels at
# full size (docs/benchmarks.md §48): (rows, tiles, warps, stages) -> bytes the first GEMM to fail required. The
# shapes that launched there: 1x1 at 4 warps / 4 stages and 8 / 3, 2x1 / 3 stages, 2x2 / 2 stages.
H100_SHARED = 232448
FAILED_ON_H100 = {(2, 2, 8, 3): 262144, (2, 4, 8, 2): 294912, (4, 1, 8, 2): 245760, (4, 2, 8, 3): 327680}
LAUNCHED_ON_H100 = [(1, 1, 4, 4), (1, 1, 8, 3), (2, 1, 8, 3), (2, 2, 8, 2)]


def full_size_gemms() -> list[tuple[GemmConfig, int, int, int]]:
    """The full-size expert's GEMMs in launch order: (tile config, column tiles, epilogue, K chunks packed)."""
    e = PRESETS["pi05"].expert
    qkv, o, gate_up, down = gemm_configs(KernelConfig(), e.width, e.num_heads, e.head_dim, e.mlp_dim).values()
    return [(qkv, (e.num_heads + 2) * e.head_dim // qkv.block_n, EPI_QKV, e.width // qkv.k_chunk),
            (o, e.width // o.block_n, EPI_RESIDUAL, e.num_heads * e.head_dim // o.k_chunk),
            (gate_up, 2 * e.mlp_dim // gate_up.block_n, EPI_GEGLU, e.width // gate_up.k_chunk),
            (down, e.width // down.block_n, EPI_RESIDUAL, e.mlp_dim // down.k_chunk)]


def batch_shapes(shape: tuple[int, int, int, int], batch: int = 8, limit: int | None = None) -> list[tuple]:
    config = KernelConfig(batch_rows=shape[0], batch_tiles=shape[1], batch_warps=shape[2], batch_stages=shape[3])
    head_dim = PRESETS["pi05"].expert.head_dim
    return [(cfg, epi, launch_shape(config, cfg, tiles, epi, head_dim, batch, 64, limit, splits)[:4])
            for cfg, tiles, epi, splits in full_size_gemms()]


def test_the_shared_memory_estimate_matches_what_triton_required_on_an_h100() -> None:
    for shape, required in FAILED_ON_H100.items():
        needs = [shared_bytes(cfg, r, t, s, epi, 64) for cfg, epi, (r, t, _, s) in batch_shapes(shape)]
        first_over = next(n for n in needs if n > H100_SHARED)
        assert first_over == required, (shape, needs)
    for shape in LAUNCHED_ON_H100:  # as batch shapes (at 2 rows, as they ran); batch 1's own tiles below
        assert all(shared_bytes(cfg, r, t, s, epi, 64) <= H100_SHARED
                   for cfg, epi, (r, t, _, s) in batch_shapes(shape, batch=2)), shape
    assert all(shared_bytes(cfg, r, t, s, epi, 64) <= H100_SHARED
               for cfg, epi, (r, t, _, s) in batch_shapes(LAUNCHED_ON_H100[0], batch=1))


@pytest.mark.parametrize("limit", [H100_SHARED, 101376], ids=["hopper", "ada"])  # Ada: 99 KiB a program
def test_a_shape_too_large_for_the_device_is_fitted_to_it(limit: int) -> None:
    for shape in [*FAILED_ON_H100, (8, 4, 8, 4)]:
        fitted = batch_shapes(shape, limit=limit)
        assert all(shared_bytes(cfg, r, t, s, epi, 64) <= limit for cfg, epi, (r, t, _, s) in fitted), shape
        assert all(s >= 2 and r <= shape[0] and t <= shape[1] for _, _, (r, t, _, s) in fitted)
    # what fits keeps its shape: batch 1's measured tiles and the default batch shape on Hopper
    if limit == H100_SHARED:
        for batch in (1, 8):
            assert batch_shapes((2, 1, 8, 3), batch, limit) == batch_shapes((2, 1, 8, 3), batch, None)
        assert [fitted[2] for fitted in batch_shapes((2, 2, 8, 3), limit=limit)] == [
            (2, 2, 8, 3), (2, 2, 8, 3), (2, 2, 8, 2), (2, 2, 8, 3)]  # only gate_up gives up a stage
    else:  # Ada: batch 1's gate_up (160 KiB at 4 stages) gives up 2 stages; the default batch shape (120-144 KiB
        # at 2 stages) its second row too
        assert batch_shapes((2, 1, 8, 3), 1, limit)[2][2] == (1, 1, 4, 2)
        assert [fitted[2] for fitted in batch_shapes((2, 1, 8, 3), 8, limit)] == [(1, 1, 8, 2)] * 4


def test_the_whole_k_reads_padded_chunks_right() -> None:
    """K not a multiple of the K chunk (96 in 64s, 192 in 128s): the packing pads the last chunk with zero rows,
    and a batch that takes the whole K must read it as batch 1's split programs do."""
    odd = SMALL.replace(expert=GemmaConfig(width=96, depth=1, mlp_dim=192, num_heads=2, num_kv_heads=1, head_dim=64))
    model = random_model(odd, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    fast = FastModel(model, torch.float32)
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 255, (2, 2, 224, 224, 3), dtype=torch.uint8, generator=gen)
    prefix = prefill_eager_batch(fast, images, [torch.randn(n, odd.vlm.width, generator=gen) for n in (4, 11)])
    noise = torch.randn(2, odd.action_horizon, odd.action_dim, generator=gen)
    want = denoise_eager(fast, prefix, noise, 2)
    config = dataclasses.replace(SPLIT, qkv=GemmConfig(32, 64), gate_up=GemmConfig(64, 64), batch_split_k=False,
                                 batch_k_step=32)
    kernels = ExpertKernels(fast, config, max_batch=2)
    assert {p.splits for p in vars(kernels.layers[0]).values()} == {2}  # every K in 2 chunks, the last padded
    x = noise.clone()
    kernels.denoise(x, prefix.n_valid, [k.clone() for k in prefix.keys], [v.clone() for v in prefix.values],
                    kernels.schedule(fast.step_schedule(2)))
    assert rel_err(x, want) < 1e-5  # float32: summation order only


def test_a_batch_may_take_the_whole_k_and_its_own_k_step() -> None:
    config = KernelConfig(batch_split_k=False, batch_k_step=64)
    head_dim = PRESETS["pi05"].expert.head_dim
    assert [gemm[3] for gemm in full_size_gemms()] == [1, 4, 1, 4]  # o and down split K in 4
    for cfg, tiles, epi, splits in full_size_gemms():
        alone = launch_shape(config, cfg, tiles, epi, head_dim, 1, 64, H100_SHARED, splits)
        assert (alone.k_chunk, alone.k_step, alone.splits) == (cfg.k_chunk, cfg.step, splits)  # batch 1 as measured
        batch = launch_shape(config, cfg, tiles, epi, head_dim, 8, 64, H100_SHARED, splits)
        assert (batch.k_chunk, batch.k_step, batch.splits) == (cfg.k_chunk * splits, 64, 1)
    o, tiles, epi, splits = full_size_gemms()[1]
    split = launch_shape(KernelConfig(), o, tiles, epi, head_dim, 8, 64, H100_SHARED, splits)  # the default
    assert (split.k_chunk, split.k_step, split.splits) == (512, 128, 4)


def test_a_gemm_may_have_its_own_batch_shape() -> None:
    own = BatchShape(1, 4, 4, 2, 64, False)
    config = KernelConfig(batch_gemms=(("o", own),), batch_key_splits=3)
    head_dim = PRESETS["pi05"].expert.head_dim
    for name, (cfg, tiles, epi, splits) in zip(("qkv", "o", "gate_up", "down"), full_size_gemms(), strict=True):
        shape = launch_shape(config, cfg, tiles, epi, head_dim, 8, 64, H100_SHARED, splits, gemm=name)
        default = launch_shape(KernelConfig(), cfg, tiles, epi, head_dim, 8, 64, H100_SHARED, splits)
        if name == "o":  # o: 1 row x 4 tiles, 4 warps, 2 stages, its whole K (2048) 64 at a time
            assert shape == (1, 4, 4, 2, 2048, 64, 1)
        else:
            assert shape == default
        alone = launch_shape(config, cfg, tiles, epi, head_dim, 1, 64, H100_SHARED, splits, gemm=name)
        assert alone == launch_shape(KernelConfig(), cfg, tiles, epi, head_dim, 1, 64, H100_SHARED, splits)
    assert (config.key_splits_for(1), config.key_splits_for(2)) == (7, 3)  # batch 1 keeps its measured splits
    assert KernelConfig().key_splits_for(8) == 7


def test_a_gemms_own_batch_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="batch_gemms names 'up'; the GEMMs are qkv, o, gate_up, down"):
        KernelConfig(batch_gemms=(("up", BatchShape(2, 1)),))
    with pytest.raises(ValueError, match=r"batch_gemms\[down\].tiles must be a power of two, got 3"):
        KernelConfig(batch_gemms=(("down", BatchShape(2, 3)),))
    with pytest.raises(ValueError, match=r"batch_gemms\[qkv\].k_step must be 0 or a power of two >= 16, got 8"):
        KernelConfig(batch_gemms=(("qkv", BatchShape(2, 1, 8, 3, 8)),))
    with pytest.raises(ValueError, match="batch_key_splits must be >= 0, got -1"):
        KernelConfig(batch_key_splits=-1)


def test_batch_shapes_must_be_powers_of_two() -> None:
    with pytest.raises(ValueError, match="batch_rows must be a power of two, got 3"):
        KernelConfig(batch_rows=3)
    with pytest.raises(ValueError, match="batch_tiles must be a power of two, got 0"):
        KernelConfig(batch_tiles=0)
    for step in (48, 8):
        with pytest.raises(ValueError, match=f"batch_k_step must be 0 or a power of two >= 16, got {step}"):
            KernelConfig(batch_k_step=step)


def test_a_batch_failing_on_the_kernels_moves_batches_to_the_torch_path_only(
        small, replaying_graphs: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A GPU without the shared memory a batch shape needs fails at the first batch launch (as a graph is made):
    batches then take the torch path, and batch 1 stays on the kernels (a failure at batch 1 still moves
    everything)."""
    import numpy as np

    from pi05_ros.engine.fast.pipeline import Pi05Pipeline

    fast, _, _ = small
    rows = prepared_rows(6, (5, 9), views=1)
    pipe = Pi05Pipeline(fast, precision="bf16", use_graphs=False, compile=False, max_batch=2, expert_kernels="on")
    pipe.use_graphs = True  # the graph path, with the stand-in above
    real_step = ExpertKernels.denoise_step

    def out_of_resources_for_batches(self, x_t, *args):
        if x_t.shape[0] > 1:
            raise RuntimeError("out of resource: shared memory, Required: 131072, Hardware limit: 101376")
        return real_step(self, x_t, *args)

    monkeypatch.setattr(ExpertKernels, "denoise_step", out_of_resources_for_batches)
    with caplog.at_level("WARNING"):
        batched, _ = pipe.run_batch(rows, 2)
    assert "failed for a batch of 2" in caplog.text and "batch 1 stays on the kernels" in caplog.text
    assert (pipe.path_for(1), pipe.path_for(2)) == ("kernels", "torch")
    torch_path = Pi05Pipeline(fast, precision="bf16", use_graphs=False, compile=False, max_batch=2,
                              expert_kernels="off")
    np.testing.assert_allclose(batched, torch_path.run_batch(rows, 2)[0], rtol=0, atol=0)  # the torch path's rows
    alone, _ = pipe.run(rows[0], 2)  # batch 1 on the kernels: float32, summation order only
    assert rel_err(torch.from_numpy(alone), torch.from_numpy(batched[0])) < 1e-5

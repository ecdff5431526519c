"""Attention with one K/V head as one flash-style Triton kernel (+ a combine kernel when the keys are split), and
its torch definition (`blocks._gqa_attention`).

Pi0.5's Gemma layers (prefix and action expert) have 8 query heads and a single K/V head. Folding the heads into
the query rows makes every (token, head) row an independent query against the same keys: q [B, N, H, D] is
[B, N * H, D] as laid out. The torch path computes that as GEMM -> masked softmax -> GEMM, writing the whole
[B, N * H, keys] score matrix in float32 between them: at a batch of 8 that is 2.1 ms of the prefill's 21 and
2 ms of the denoise loop's 14 on an H100 (docs/benchmarks.md §51). Here one program takes BM query rows of one
batch row through its keys KB at a time with an online softmax, so the scores never leave the SM.

Programs: (batch row, block of BM query rows, key split). Few query blocks (the expert's 400 rows at batch 1)
would leave most SMs idle, so the keys are then split over `splits` programs that each write an unnormalized
partial (acc, running max, running sum), and `_combine_kernel` merges them (flash-decoding). With one split the
attention kernel writes the output itself.

Numerics: the scores are float32 (the torch path rounds them to the input dtype first), the softmax is float32,
and the probabilities meet V in the input dtype, as in the torch path. A row whose keys are all masked gives NaN,
as the torch path's softmax does.

`flash_gqa_attention` is a torch custom op, so the torch.compile'd layer functions call it as one opaque node.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pi05_ros.engine.fast.kernels import KERNEL_DTYPES, MEASURED_MAJOR, capability_major, tl_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # importable without Triton; blocks.py only offers "flash" where kernels.available()
    triton = None

# Tile shape: the fastest at the batched prefill (8 rows x 560 tokens x 8 heads against 560 keys, H100) of a sweep
# over 64/128 query rows, 32/64/128 keys per step, 4/8 warps, 2/3 stages (`tools/attention_gpu.py --sweep`,
# docs/benchmarks.md §51). The float32 accumulator is BLOCK_ROWS x 256 for Gemma's head dim.
BLOCK_ROWS = 64
KEY_BLOCK = 32
WARPS = 4
STAGES = 2
# How a program walks its keys (the kernel's WALK):
# - "all": every key block of its split, masked ones computed too;
# - "skip": the same, skipping (a branch in the loop) the blocks with no valid key (the default off Hopper);
# - "runs": only the blocks of the mask's leading and trailing runs of valid keys (a row's prefix; the expert's
#   suffix), found once per program, with no branch in the loop so Triton can pipeline its loads; the splits share
#   out those blocks alone (expert.py's attention does the same from n_valid). A mask with valid keys between the
#   two runs is outside this walk's contract: its output is NaN, never a silent wrong answer.
KEY_WALKS = ("all", "skip", "runs")  # the kernel's WALK is the index
# None: each GPU's measured walk (`key_walk`); a name forces that walk everywhere (tests and tools set it).
KEY_WALK: str | None = None


def key_walk(device: torch.device) -> str:
    """The walk the kernel takes on `device`: KEY_WALK where set, else "runs" on Hopper, where it measured faster
    (a batch of 8's prefill 0.56-0.58 ms, same actions, H100, docs/benchmarks.md §70), and "skip" elsewhere: the
    runs walk's multi-buffered loads hold 128 KiB of shared memory at these tiles, more than Ada's ~100 KiB, and it
    was measured on no other GPU."""
    if KEY_WALK is not None:
        return KEY_WALK
    return walk_for(capability_major(device)) if device.type == "cuda" else "skip"


def walk_for(major: int) -> str:
    """The measured walk for a CUDA GPU of compute capability `major`.x (key_walk's rule; the offline compile's)."""
    return "runs" if major == MEASURED_MAJOR else "skip"


@functools.cache
def _kernels() -> tuple:
    """The two kernels, defined at first use: whether Triton interprets them (TRITON_INTERPRET=1, tests on the CPU)
    is fixed when they are defined, and this module is imported with the fast path, before tests choose."""

    # A module global (defined here, at first use, as the kernels are): the interpreter looks a kernel's callees
    # up in its module's globals, not in this function's scope.
    global _key_block

    @triton.jit
    def _key_block(q, k_ptr, v_ptr, key, valid, kv_rstride, scale, m_i, l_i, acc,
                   D: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
        """One block of keys into the online softmax: the new (running max, running sum, accumulator). Masked keys
        are not read: whatever a padded row's K/V hold (even NaN) cannot reach the output."""
        rd = tl.arange(0, D)
        kt = tl.load(k_ptr + key[None, :] * kv_rstride + rd[:, None], mask=valid[None, :], other=0.0)
        scores = tl.dot(q, kt, input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep exp() finite
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + key[:, None] * kv_rstride + rd[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _flash_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, acc_ptr, m_ptr, l_ptr,
        q_rows, keys, q_bstride, kv_bstride, kv_rstride, mask_bstride, out_bstride, scale, blocks_per_split,
        D: tl.constexpr, BM: tl.constexpr, KB: tl.constexpr, SPLITS: tl.constexpr, DT: tl.constexpr,
        WALK: tl.constexpr, PRECISION: tl.constexpr, KEYS_P2: tl.constexpr,
    ):
        """BM folded query rows of one batch row against one split of its keys. One split: the normalized output
        into out [B, rows, D]. Several: unnormalized partials into acc / m / l, indexed (row, block, split).
        WALK: 0 every block of the split, 1 the same skipping blocks without a valid key, 2 the blocks of the
        mask's leading and trailing runs of valid keys (KEYS_P2: `keys` rounded up to a power of two)."""
        pid_b = tl.program_id(0)
        block = tl.program_id(1)
        split = tl.program_id(2)
        rm = block * BM + tl.arange(0, BM)
        rd = tl.arange(0, D)
        row_ok = rm < q_rows
        q = tl.load(q_ptr + pid_b * q_bstride + rm[:, None] * D + rd[None, :], mask=row_ok[:, None], other=0.0)
        k_ptr += pid_b * kv_bstride
        v_ptr += pid_b * kv_bstride
        mask_ptr += pid_b * mask_bstride
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        if WALK == 2:
            # The mask row once: its leading run ends at the first masked key, its trailing run starts past the
            # last one. The loop below visits only those runs' blocks, with no branch in it.
            kk = tl.arange(0, KEYS_P2)
            in_keys = kk < keys
            row_valid = tl.load(mask_ptr + kk, mask=in_keys, other=1) != 0
            lead = tl.min(tl.where(row_valid, keys, kk), axis=0)
            trail = tl.maximum(tl.max(tl.where(row_valid, 0, kk + 1), axis=0), lead)
            # valid keys between the runs would be missed: make the result NaN rather than silently wrong
            stray = tl.sum((row_valid & in_keys).to(tl.int32), axis=0) - lead - (keys - trail)
            scale = tl.where(stray == 0, scale, float("nan"))
            lead_blocks = tl.cdiv(lead, KB)
            trail_first = tl.maximum(trail // KB, lead_blocks)  # a block holding both runs' keys is visited once
            # no trailing run (the prefill's masks): no block past the leading run's, even where keys % KB != 0
            run_blocks = lead_blocks + tl.where(trail < keys, tl.cdiv(keys, KB) - trail_first, 0)
            per_split = tl.cdiv(run_blocks, SPLITS)
            first = split * per_split
            for j in range(first, tl.minimum(first + per_split, run_blocks)):
                key_block = tl.where(j < lead_blocks, j, trail_first + j - lead_blocks)
                key = key_block * KB + tl.arange(0, KB)
                valid = (key < lead) | ((key >= trail) & (key < keys))
                m_i, l_i, acc = _key_block(q, k_ptr, v_ptr, key, valid, kv_rstride, scale, m_i, l_i, acc,
                                           D, DT, PRECISION)
        else:
            for b in range(blocks_per_split):
                key = (split * blocks_per_split + b) * KB + tl.arange(0, KB)
                in_range = key < keys
                valid = in_range & (tl.load(mask_ptr + key, mask=in_range, other=0) != 0)
                # a block with no valid key (the prefix rows past every prompt) is skipped, not computed
                if WALK == 0 or tl.max(valid.to(tl.int32), axis=0) > 0:
                    m_i, l_i, acc = _key_block(q, k_ptr, v_ptr, key, valid, kv_rstride, scale, m_i, l_i, acc,
                                               D, DT, PRECISION)
        if SPLITS == 1:
            tl.store(out_ptr + pid_b * out_bstride + rm[:, None] * D + rd[None, :], (acc / l_i[:, None]).to(DT),
                     mask=row_ok[:, None])
        else:
            part = (pid_b * tl.num_programs(1) + block) * SPLITS + split
            tl.store(acc_ptr + (part * BM + tl.arange(0, BM)[:, None]) * D + rd[None, :], acc)
            tl.store(m_ptr + part * BM + tl.arange(0, BM), m_i)
            tl.store(l_ptr + part * BM + tl.arange(0, BM), l_i)

    @triton.jit
    def _combine_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, q_rows, out_bstride,
        D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, SPLITS: tl.constexpr,
        DT: tl.constexpr,
    ):
        """The key splits' partials of BR rows x BD columns of one query block -> the output. One program per
        (batch row x query block, row block, column block)."""
        pid = tl.program_id(0)  # batch row * query blocks + block, in _flash_kernel's order
        blocks = tl.cdiv(q_rows, BM)
        pid_b = pid // blocks
        r = tl.program_id(1) * BR + tl.arange(0, BR)  # within the block
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        row_ok = (pid % blocks) * BM + r < q_rows
        top = tl.full((BR,), float("-inf"), dtype=tl.float32)
        for s in range(SPLITS):
            top = tl.maximum(top, tl.load(m_ptr + (pid * SPLITS + s) * BM + r))
        top = tl.where(top == float("-inf"), 0.0, top)
        num = tl.zeros((BR, BD), dtype=tl.float32)
        den = tl.zeros((BR,), dtype=tl.float32)
        for s in range(SPLITS):
            part = pid * SPLITS + s
            w = tl.exp(tl.load(m_ptr + part * BM + r) - top)
            den += w * tl.load(l_ptr + part * BM + r)
            num += w[:, None] * tl.load(acc_ptr + (part * BM + r[:, None]) * D + d[None, :])
        row = (pid % blocks) * BM + r
        tl.store(out_ptr + pid_b * out_bstride + row[:, None] * D + d[None, :], (num / den[:, None]).to(DT),
                 mask=row_ok[:, None])

    return _flash_kernel, _combine_kernel


def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM (the interpreter: a handful, to exercise the splits)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def key_splits(batch: int, q_rows: int, keys: int, programs: int, block_rows: int = BLOCK_ROWS,
               key_block: int = KEY_BLOCK) -> tuple[int, int]:
    """(splits, key blocks per split): enough programs to fill the GPU, every split with at least one key block."""
    blocks = -(-keys // key_block)
    query_programs = batch * -(-q_rows // block_rows)
    splits = max(1, min(blocks, -(-programs // query_programs)))
    per_split = -(-blocks // splits)
    return -(-blocks // per_split), per_split


# The schema is spelled out: torch 2.4 cannot infer it from this module's string annotations.
@torch.library.custom_op("pi05::flash_gqa_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor key_mask) -> Tensor")
def flash_gqa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """q [B, N, H, D] against one K/V head k, v [B, 1, L, D] -> [B, N, H * D]; key_mask [B, 1, 1, L] bool (each
    row's valid keys; [1, 1, 1, L] serves every row). `blocks._gqa_attention`'s contract."""
    if triton is None:
        raise RuntimeError("flash_gqa_attention needs Triton; use the GEMM attention")
    b, n, h, d = q.shape
    keys = k.shape[2]
    if k.dim() != 4 or k.shape[0] != b or k.shape[1] != 1 or k.shape[3] != d:
        raise ValueError(f"flash_gqa_attention: k must be [{b}, 1, L, {d}] for q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if key_mask.dtype != torch.bool or key_mask.numel() not in (keys, b * keys) or key_mask.shape[-1] != keys:
        raise ValueError(f"flash_gqa_attention: key_mask must be bool [1 or {b}, 1, 1, {keys}], got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_gqa_attention takes bf16, fp16 or fp32 q, k, v of one dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.stride(-1) != 1 or v.stride() != k.stride() or k.shape != v.shape:
        raise ValueError("flash_gqa_attention needs K and V with contiguous rows, laid out alike")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    q = q.contiguous()
    mask = key_mask.reshape(key_mask.shape[0], keys)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    mask = mask.view(torch.uint8)
    rows = n * h
    out = q.new_empty(b, n, h * d)
    splits, per_split = key_splits(b, rows, keys, _programs_wanted(q.device), BLOCK_ROWS, KEY_BLOCK)
    blocks = triton.cdiv(rows, BLOCK_ROWS)
    dt = tl_dtype(q.dtype)
    if splits > 1:
        parts = b * blocks * splits * BLOCK_ROWS
        acc = torch.empty(parts * d, dtype=torch.float32, device=q.device)
        m = torch.empty(parts, dtype=torch.float32, device=q.device)
        l_sum = torch.empty(parts, dtype=torch.float32, device=q.device)
    else:
        acc = m = l_sum = out  # not written
    launch = {"num_warps": WARPS, "num_stages": STAGES} if q.device.type == "cuda" else {}
    walk = key_walk(q.device)
    flash_kernel, combine_kernel = _kernels()
    flash_kernel[(b, blocks, splits)](
        q, k, v, mask, out, acc, m, l_sum,
        rows, keys, rows * d, k.stride(0), k.stride(2), mask.stride(0) if mask.shape[0] > 1 else 0, rows * d,
        d**-0.5, per_split, D=d, BM=BLOCK_ROWS, KB=KEY_BLOCK, SPLITS=splits, DT=dt, WALK=KEY_WALKS.index(walk),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # read by the runs walk alone: the others get one value, not a compilation per key count
        KEYS_P2=triton.next_power_of_2(keys) if walk == "runs" else 1,
        **launch,  # float32 stays float32 (no TF32)
    )
    if splits > 1:
        br, bd = 16, min(64, d)
        combine_kernel[(b * blocks, BLOCK_ROWS // br, d // bd)](
            acc, m, l_sum, out, rows, rows * d, D=d, BM=BLOCK_ROWS, BR=br, BD=bd, SPLITS=splits, DT=dt,
            **({"num_warps": 4} if q.device.type == "cuda" else {}),
        )
    return out


@flash_gqa_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    b, n, h, d = q.shape
    return q.new_empty(b, n, h * d)

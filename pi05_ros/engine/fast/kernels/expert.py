"""The action expert's denoise step in six fused Triton kernels per layer, and their torch definition.

Per layer and step (M = horizon = 50 rows, W = 1024, 8 query heads + 1 K/V head of 256, MLP 4096):

    qkv      y = r * ((x * (1+scale1)) @ Wqkv) + shift1 @ Wqkv        RoPE on q and k; k, v into the cache
    attend   softmax(q k^T / sqrt(d)) v over prefix + suffix keys, split over the keys (flash-decoding)
    combine  the key splits' partial softmaxes -> attention output
    o        x += gate1 * (attn @ Wo)
    gate_up  h = gelu_tanh(r * ((x * (1+scale2)) @ Wg) + shift2 @ Wg) * (same with Wu)
    down     x += gate2 * (h @ Wd)

where r = rsqrt(mean(x^2) + eps) per row. Writing the adaRMS norm this way (scale before the GEMM, the row
factor and the shift after it) lets each GEMM program start from raw x without a norm kernel before it, and
the shift's product `shift @ W` depends only on t, so it is computed once per step schedule.

Why this shape (docs/fast_path.md has the measurements):
- At M = 50 a GEMM is a stream of weights. Each program reads one contiguous [KC, BN] weight block (packed
  at load), so all SMs stream at once; the K dimension is split in S slices, and the last program to finish
  a column tile (an atomic counter, reset by that program) sums the S partials in a fixed order and runs the
  epilogue: deterministic, no extra kernel, no memset.
- With programmatic dependent launch (Hopper), every kernel launches while its predecessor drains and loads
  its weights before `gdc_wait`: weights never depend on the previous kernel, so their fetch overlaps it.
- Paired column tiles: a q/k tile holds columns j and j + d/2 of one head (RoPE rotates those two), a
  gate_up tile holds gate column j and up column j (GeGLU multiplies those two), so the epilogues stay local.
- Batches (a server's rows, M = 50 per row, each with its own K/V cache and prompt length): every kernel's grid
  gains a batch dimension. A GEMM program takes R batch rows x T column tiles (KernelConfig.batch_*; batch 1 runs
  R = T = 1), so each weight chunk it loads serves R rows and each activation chunk T tiles; the programs of a
  tile group are adjacent, so its weight blocks come from HBM once. Attention and the small kernels run one
  program per row and head / tile.

Each layer as one persistent kernel instead (resident programs running the six kernels' work as phases with
grid-wide syncs between them) was built and measured 1.6x slower on an H200: with one program per SM a phase's
tiles run one after another, where the six kernels keep several CTAs per SM in flight (docs/benchmarks.md §42;
the code is in git history at 4e7d08b).

`ExpertKernels.denoise` replaces `FastModel.denoise`; `expert_layer_torch` is the same math in plain torch
(the kernels are tested against it, and it against `blocks.expert_layer`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from pi05_ros.engine.fast.kernels import interpreting, tl_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; `available()` says the kernels cannot run
    triton = None

EPI_QKV, EPI_GEGLU, EPI_RESIDUAL = 0, 1, 2
FP8_MAX = 448.0


# ------------------------------------------------------------------------------------------------ kernels

if triton is not None:
    # Triton kernels read module globals only as constexpr.
    _QKV, _GEGLU, _RESIDUAL = tl.constexpr(EPI_QKV), tl.constexpr(EPI_GEGLU), tl.constexpr(EPI_RESIDUAL)

    @triton.jit
    def _gelu_tanh(x):
        # 0.5 * (1 + tanh(z)) == sigmoid(2 z)
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))

    @triton.jit
    def _expert_gemm_kernel(
        a_ptr, a_stride, a_bstride,
        w_ptr, w_scale_ptr,
        ws_ptr, count_ptr,
        ssp_in_ptr, ss_tiles, ss_bstride,
        bias_ptr, gate_ptr,
        out_ptr, out_stride, out_bstride,
        next_mod_ptr, xm_ptr, xm_bstride, ssp_out_ptr,
        k_ptr, v_ptr, kv_bstride, cos_ptr, sin_ptr, n_valid_ptr, cache_row0,
        batch, M, K, N, eps,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MLP: tl.constexpr,
        EPILOGUE: tl.constexpr, NEXT: tl.constexpr, W_FP8: tl.constexpr, DT: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, BK: tl.constexpr, S: tl.constexpr,
        R: tl.constexpr, T: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """out = epilogue(A @ W) for the batch's A [batch, M, K] (M <= BM rows each, GEMM dtype) and packed W. One
        program per (group of R batch rows, group of T column tiles, K split): batch 1 runs R = T = 1, a tile's
        weight block streamed by its own program; a batch shares each weight chunk among R rows and each A chunk
        among T tiles (fewer reads from L2). The programs of a tile group are adjacent in the grid, so its weight
        blocks come from HBM once. Per-row buffers are addressed as base + batch row * their batch stride.

        QKV / GEGLU: A is x * (1 + scale) (written by the previous kernel); the rows' sums of squares arrive as
        `ss_tiles` partials in ssp_in, giving r = rsqrt(mean(x^2) + eps) for y = r * acc + shift @ W.
        RESIDUAL: x += gate * acc; with NEXT it also writes the next GEMM's A (x * next_mod, GEMM dtype) and each
        tile's partial sums of squares of x, so the next kernel needs no norm pass.
        """
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        pid_g = tl.program_id(0)  # row group
        pid_t = tl.program_id(1)  # tile group
        pid_s = tl.program_id(2)  # K split
        PAIRED: tl.constexpr = EPILOGUE != _RESIDUAL
        HB: tl.constexpr = BN // 2
        WN: tl.constexpr = HB if PAIRED else BN  # columns per accumulator and tile
        RB: tl.constexpr = R * BM  # rows per program
        CN: tl.constexpr = T * WN  # columns per accumulator
        WS_N: tl.constexpr = 2 * CN if PAIRED else CN  # columns of a split-K partial: lo (and hi beside it)
        rk = tl.arange(0, BK)
        cc = tl.arange(0, CN)
        tile = pid_t * T + cc // WN  # each column's tile
        w_base = w_ptr + ((tile[None, :] * S + pid_s) * KC + rk[:, None]) * BN + (cc % WN)[None, :]
        # The first weight chunk before the wait: weights never depend on the previous kernel.
        if PREFETCH:
            w0 = tl.load(w_base)
            if PAIRED:
                w0_hi = tl.load(w_base + HB)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        if not PREFETCH:
            w0 = tl.load(w_base)
            if PAIRED:
                w0_hi = tl.load(w_base + HB)
        rr = tl.arange(0, RB)
        b = pid_g * R + rr // BM  # each row's batch row
        rm = rr % BM  # and its row there
        row_ok = (rm < M) & (b < batch)
        ka = pid_s * KC + rk
        a_rows = a_ptr + b[:, None] * a_bstride + rm[:, None] * a_stride + ka[None, :]
        a = tl.load(a_rows, mask=row_ok[:, None] & (ka[None, :] < K), other=0.0)
        lo = tl.dot(a, w0.to(DT))
        if PAIRED:
            hi = tl.dot(a, w0_hi.to(DT))
        for kk in tl.range(1, KC // BK, num_stages=STAGES):
            a = tl.load(a_rows + kk * BK, mask=row_ok[:, None] & (ka[None, :] + kk * BK < K), other=0.0)
            w = w_base + kk * BK * BN
            lo += tl.dot(a, tl.load(w).to(DT))
            if PAIRED:
                hi += tl.dot(a, tl.load(w + HB).to(DT))
        if S > 1:
            # Split K: partials to the workspace; the last of the S programs of this (row group, tile group) sums
            # them in a fixed order (deterministic). The counter orders the stores (release) before its loads
            # (acquire) and is reset for the next use.
            group = pid_g * tl.num_programs(1) + pid_t
            ws_tile = ws_ptr + (group * S * RB + rr[:, None]) * WS_N + cc[None, :]
            part_stride = RB * WS_N
            tl.store(ws_tile + pid_s * part_stride, lo, mask=row_ok[:, None])
            if PAIRED:
                tl.store(ws_tile + pid_s * part_stride + CN, hi, mask=row_ok[:, None])
            tl.debug_barrier()
            is_last = tl.atomic_add(count_ptr + group, 1, sem="acq_rel", scope="gpu") == S - 1
        else:
            is_last = True
        if is_last:
            if S > 1:
                tl.atomic_xchg(count_ptr + group, 0, sem="relaxed", scope="gpu")
                lo = tl.load(ws_tile, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                if PAIRED:
                    hi = tl.load(ws_tile + CN, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                for s in range(1, S):
                    lo += tl.load(ws_tile + s * part_stride, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
                    if PAIRED:
                        hi += tl.load(ws_tile + s * part_stride + CN, mask=row_ok[:, None], other=0.0,
                                      cache_modifier=".cg")
            if PAIRED:
                ss = tl.zeros((RB,), dtype=tl.float32)
                for t in range(ss_tiles):
                    ss += tl.load(ssp_in_ptr + b * ss_bstride + t * BM + rm, mask=row_ok, other=0.0)
                r = tl.rsqrt(ss / K + eps)
            if EPILOGUE == _QKV:
                HALF: tl.constexpr = HEAD_DIM // 2
                TILES_PER_HEAD: tl.constexpr = HALF // HB  # a program's T tiles lie in one head (T divides this)
                head = (pid_t * T) // TILES_PER_HEAD
                j = (tile % TILES_PER_HEAD) * HB + cc % WN
                col_lo = head * HEAD_DIM + j
                if W_FP8:
                    lo = lo * tl.load(w_scale_ptr + col_lo)[None, :]
                    hi = hi * tl.load(w_scale_ptr + col_lo + HALF)[None, :]
                y_lo = lo * r[:, None] + tl.load(bias_ptr + col_lo)[None, :]
                y_hi = hi * r[:, None] + tl.load(bias_ptr + col_lo + HALF)[None, :]
                if head <= HEADS:  # q heads and the k head get RoPE at positions n_valid + row
                    pos = tl.load(n_valid_ptr + b, mask=row_ok, other=0) + rm
                    table = pos[:, None] * HEAD_DIM + j[None, :]
                    cos = tl.load(cos_ptr + table, mask=row_ok[:, None], other=0.0)
                    sin = tl.load(sin_ptr + table, mask=row_ok[:, None], other=0.0)
                    y_lo, y_hi = y_lo * cos - y_hi * sin, y_hi * cos + y_lo * sin
                cache_rows = b[:, None] * kv_bstride + (cache_row0 + rm[:, None]) * HEAD_DIM + j[None, :]
                if head < HEADS:
                    dst = out_ptr + b[:, None] * out_bstride + (head * BM + rm[:, None]) * HEAD_DIM + j[None, :]
                elif head == HEADS:
                    dst = k_ptr + cache_rows
                else:
                    dst = v_ptr + cache_rows
                tl.store(dst, y_lo.to(DT), mask=row_ok[:, None])
                tl.store(dst + HALF, y_hi.to(DT), mask=row_ok[:, None])
            elif EPILOGUE == _GEGLU:
                col = pid_t * CN + cc  # tiles are consecutive: tile * HB + its column
                if W_FP8:
                    lo = lo * tl.load(w_scale_ptr + col)[None, :]
                    hi = hi * tl.load(w_scale_ptr + MLP + col)[None, :]
                gate = lo * r[:, None] + tl.load(bias_ptr + col)[None, :]
                up = hi * r[:, None] + tl.load(bias_ptr + MLP + col)[None, :]
                h = _gelu_tanh(gate) * up
                dst = out_ptr + b[:, None] * out_bstride + rm[:, None] * out_stride + col[None, :]
                tl.store(dst, h.to(DT), mask=row_ok[:, None])
            else:
                col = pid_t * CN + cc
                col_ok = col < N
                if W_FP8:
                    lo = lo * tl.load(w_scale_ptr + col, mask=col_ok, other=0.0)[None, :]
                gate = tl.load(gate_ptr + col, mask=col_ok, other=0.0)
                mask = row_ok[:, None] & col_ok[None, :]
                x_ptrs = out_ptr + b[:, None] * out_bstride + rm[:, None] * out_stride + col[None, :]
                x = tl.load(x_ptrs, mask=mask, other=0.0) + lo * gate[None, :]
                tl.store(x_ptrs, x, mask=mask)
                if NEXT:
                    _emit_next(x, col, col_ok, mask, row_ok, xm_ptr + b * xm_bstride + rm * N,
                               ssp_out_ptr + b * ss_bstride + rm, pid_t * T, next_mod_ptr, BM, BN, T, DT)

    @triton.jit
    def _emit_next(x, col, col_ok, mask, row_ok, xm_rows, ssp_rows, first_tile, next_mod_ptr,
                   BM: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, DT: tl.constexpr):
        """The next modulated GEMM's input x * (1 + scale) and each of the T column tiles' partial sums of x^2:
        x [rows, T * BN]; xm_rows / ssp_rows point at each row's start in xm and in the partial sums (tile 0)."""
        mod = tl.load(next_mod_ptr + col, mask=col_ok, other=0.0)
        tl.store(xm_rows[:, None] + col[None, :], (x * mod[None, :]).to(DT), mask=mask)
        sums = tl.sum(tl.reshape(tl.where(mask, x * x, 0.0), (x.shape[0], T, BN)), axis=2)
        tiles = first_tile + tl.arange(0, T)
        tl.store(ssp_rows[:, None] + tiles[None, :] * BM, sums, mask=row_ok[:, None])

    @triton.jit
    def _modulate_kernel(x_ptr, x_bstride, next_mod_ptr, xm_ptr, xm_bstride, ssp_out_ptr, ss_bstride, M, N,
                         BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr):
        """x [B, M, N] float32 -> x * next_mod and per-column-tile partial sums of squares (a step's first layer);
        one program per (batch row, column tile)."""
        pid_b = tl.program_id(0)
        tile = tl.program_id(1)
        rm = tl.arange(0, BM)
        row_ok = rm < M
        col = tile * BN + tl.arange(0, BN)
        col_ok = col < N
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + pid_b * x_bstride + rm[:, None] * N + col[None, :], mask=mask, other=0.0)
        _emit_next(x, col, col_ok, mask, row_ok, xm_ptr + pid_b * xm_bstride + rm * N,
                   ssp_out_ptr + pid_b * ss_bstride + rm, tile, next_mod_ptr, BM, BN, 1, DT)

    @triton.jit
    def _step_in_kernel(xt_ptr, w_ptr, b_ptr, x_ptr, next_mod_ptr, xm_ptr, xm_bstride, ssp_out_ptr, ss_bstride,
                        M, N, A, BM: tl.constexpr, BN: tl.constexpr, BA: tl.constexpr, DT: tl.constexpr,
                        USE_PDL: tl.constexpr):
        """A step's start: x = x_t @ W_in^T + b_in [B, M, N] (float32; x_t [B, M, A] and x contiguous), then x *
        next_mod and the partial sums of squares for the first layer's qkv GEMM (what `_modulate_kernel` does
        after a separate linear). One program per (batch row, column tile)."""
        pid_b = tl.program_id(0)
        tile = tl.program_id(1)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rm = tl.arange(0, BM)
        ra = tl.arange(0, BA)
        row_ok = rm < M
        col = tile * BN + tl.arange(0, BN)
        col_ok = col < N
        w = tl.load(w_ptr + col[None, :] * A + ra[:, None], mask=col_ok[None, :] & (ra[:, None] < A), other=0.0)
        bias = tl.load(b_ptr + col, mask=col_ok, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        xt = tl.load(xt_ptr + pid_b * M * A + rm[:, None] * A + ra[None, :],
                     mask=row_ok[:, None] & (ra[None, :] < A), other=0.0)
        x = tl.dot(xt, w, input_precision="ieee") + bias[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(x_ptr + pid_b * M * N + rm[:, None] * N + col[None, :], x, mask=mask)
        _emit_next(x, col, col_ok, mask, row_ok, xm_ptr + pid_b * xm_bstride + rm * N,
                   ssp_out_ptr + pid_b * ss_bstride + rm, tile, next_mod_ptr, BM, BN, 1, DT)

    @triton.jit
    def _attend_kernel(
        q_ptr, q_bstride, k_ptr, v_ptr, kv_bstride, n_valid_ptr, acc_ptr, m_ptr, l_ptr,
        rows, keys_total, horizon, scale,
        S_K: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, KB: tl.constexpr, DT: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """Queries of one head (rows x D) of one batch row against one slice of its keys: an unnormalized partial
        softmax. One program per (batch row, head, key split).

        The splits share out only the key blocks that hold a valid key: the row's prefix (its first n_valid keys)
        and the suffix (the last `horizon`). The blocks between, the cache's room for longer prompts, are neither
        read nor computed, so a short prompt costs less than the longest one (with a 48-token prompt and 2 views,
        20 of 26 blocks of 32 keys). A split left without blocks writes an empty partial (m = -inf, l = 0), which
        the combine weighs at zero."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid_b = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        heads = tl.num_programs(1)
        rm = tl.arange(0, BM)
        rd = tl.arange(0, D)
        row_ok = rm < rows
        q = tl.load(q_ptr + pid_b * q_bstride + (head * BM + rm[:, None]) * D + rd[None, :], mask=row_ok[:, None],
                    other=0.0)
        k_ptr += pid_b * kv_bstride
        v_ptr += pid_b * kv_bstride
        n_valid = tl.load(n_valid_ptr + pid_b)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        prefix_blocks = tl.cdiv(n_valid, KB)
        total_blocks = tl.cdiv(keys_total, KB)
        suffix_first = tl.maximum((keys_total - horizon) // KB, prefix_blocks)  # never a prefix block twice
        valid_blocks = prefix_blocks + total_blocks - suffix_first
        per_split = tl.cdiv(valid_blocks, S_K)
        first = split * per_split
        for j in range(first, tl.minimum(first + per_split, valid_blocks)):
            block = tl.where(j < prefix_blocks, j, suffix_first + j - prefix_blocks)
            key = block * KB + tl.arange(0, KB)
            in_range = key < keys_total
            kt = tl.load(k_ptr + key[None, :] * D + rd[:, None], mask=in_range[None, :], other=0.0)
            scores = tl.dot(q, kt) * scale
            # valid keys: the prefix's n_valid rows and the suffix's last `horizon` rows
            valid = in_range & ((key < n_valid) | (key >= keys_total - horizon))
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # masked rows read as 0: a block's rows past the prefix are the cache's room, whatever it holds
            v = tl.load(v_ptr + key[:, None] * D + rd[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DT), v)
            m_i = m_new
        part = (pid_b * heads + head) * S_K + split
        tl.store(acc_ptr + (part * BM + rm[:, None]) * D + rd[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + part * BM + rm, m_i, mask=row_ok)
        tl.store(l_ptr + part * BM + rm, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, out_stride, out_bstride, rows, heads,
        S_K: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
        DT: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        """The key splits' partial softmaxes of one head -> attention output [rows, head * D + d] of one batch row.
        One program per (batch row x head, row block, column block)."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid_bh = tl.program_id(0)  # batch row * heads + head: the head's partials, in _attend_kernel's order
        head = pid_bh % heads
        r = tl.program_id(1) * BR + tl.arange(0, BR)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        row_ok = r < rows
        top = tl.full((BR,), float("-inf"), dtype=tl.float32)
        for s in range(S_K):
            top = tl.maximum(top, tl.load(m_ptr + (pid_bh * S_K + s) * BM + r, mask=row_ok, other=0.0))
        num = tl.zeros((BR, BD), dtype=tl.float32)
        den = tl.zeros((BR,), dtype=tl.float32)
        for s in range(S_K):
            part = pid_bh * S_K + s
            w = tl.exp(tl.load(m_ptr + part * BM + r, mask=row_ok, other=0.0) - top)
            den += w * tl.load(l_ptr + part * BM + r, mask=row_ok, other=1.0)
            num += w[:, None] * tl.load(acc_ptr + (part * BM + r[:, None]) * D + d[None, :],
                                        mask=row_ok[:, None], other=0.0)
        dst = out_ptr + (pid_bh // heads) * out_bstride + r[:, None] * out_stride + head * D + d[None, :]
        tl.store(dst, (num / den[:, None]).to(DT), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------ packing


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of one expert GEMM: BN output columns x KC of K per program; S = K / KC programs per tile."""

    block_n: int
    k_chunk: int  # K per program (S = K / k_chunk programs per column tile)
    num_warps: int = 4
    k_step: int = 0  # K per inner-loop iteration (0: all of k_chunk at once)
    stages: int = 3
    prefetch: bool = True  # load the first weight chunk before waiting on the previous kernel (PDL)

    @property
    def step(self) -> int:
        return self.k_step or self.k_chunk


class BatchShape(NamedTuple):
    """How one GEMM launches over a batch of 2+ rows (KernelConfig.batch_gemms): R batch rows x T column tiles per
    program, warps, pipeline stages, K per inner-loop iteration (0: the GEMM's own) and whether K is split as
    batch 1 splits it (False: one program over the whole K). (K split in programs of a batch's own number, whatever
    batch 1's packing, was built and measured slower at 2, 4 and 8 rows: docs/benchmarks.md §76; git history keeps
    it at c19c84d.)"""

    rows: int
    tiles: int
    warps: int = 8
    stages: int = 3
    k_step: int = 0
    split_k: bool = True


GEMM_NAMES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class KernelConfig:
    # Tile shapes measured fastest on an H200 (docs/benchmarks.md §20, §34): few, long programs that stream their
    # weights through a pipelined K loop; o and down split K in 4.
    qkv: GemmConfig = GemmConfig(32, 1024, 4, 128, 4)
    o: GemmConfig = GemmConfig(32, 512, 4, 128, 4)
    gate_up: GemmConfig = GemmConfig(64, 1024, 4, 128, 4)
    down: GemmConfig = GemmConfig(32, 1024, 4, 128, 4)
    key_block: int = 32  # keys per attention iteration
    key_splits: int = 7  # programs per head over the keys
    combine_rows: int = 16
    combine_cols: int = 64
    attend_warps: int = 4
    pdl: bool = True  # programmatic dependent launch where the GPU has it (SM 9.0+)
    fused_step_in: bool = True  # the action in-projection and the first modulate in one kernel (-0.09 ms at 10)
    # Batches of 2+: each GEMM program takes `batch_rows` batch rows x `batch_tiles` column tiles, so a weight chunk
    # serves several rows and an activation chunk several tiles (one row per program would read every weight
    # block from L2 once per row: ~0.3 GB per layer at batch 8). 2 x 1 was the fastest shape at batch 2 on an H100,
    # and the only one to beat the torch path there (9.76 against 10.21 ms; at 4 and 8 rows no shape did, §48).
    batch_rows: int = 2
    batch_tiles: int = 1
    batch_warps: int = 8
    batch_stages: int = 3
    # K per inner-loop iteration for batches (0: each GEMM's own k_step): a shorter step leaves shared memory for
    # wider programs. And whether a batch's GEMM splits K as batch 1's does: with many rows there are programs
    # enough without it, and one program over the whole K needs no workspace round trip (the packed layout,
    # [tile][split][chunk][column], reads the same as [tile][K][column], so no second copy of the weights).
    batch_k_step: int = 0
    batch_split_k: bool = True
    # A GEMM's own batch shape, where one shape does not suit all four (("o", BatchShape(2, 4, ...)), ...): the
    # GEMMs named here ignore the batch_* fields above.
    batch_gemms: tuple[tuple[str, BatchShape], ...] = ()
    batch_key_splits: int = 0  # programs per head over the keys for batches (0: key_splits)

    def __post_init__(self) -> None:
        shapes = [("batch", self.batch_shape())]
        for name, shape in self.batch_gemms:
            if name not in GEMM_NAMES:
                raise ValueError(f"KernelConfig.batch_gemms names {name!r}; the GEMMs are {', '.join(GEMM_NAMES)}")
            shapes.append((f"batch_gemms[{name}]", BatchShape(*shape)))
        for where, shape in shapes:
            for field in ("rows", "tiles", "warps"):
                value = getattr(shape, field)
                if value < 1 or value & (value - 1):  # Triton's block shapes and warp counts are powers of two
                    label = f"KernelConfig.batch_{field}" if where == "batch" else f"KernelConfig.{where}.{field}"
                    raise ValueError(f"{label} must be a power of two, got {value}")
            step = shape.k_step
            if step and (step < 16 or step & (step - 1)):  # tl.dot takes K of 16 or more
                label = "KernelConfig.batch_k_step" if where == "batch" else f"KernelConfig.{where}.k_step"
                raise ValueError(f"{label} must be 0 or a power of two >= 16, got {step}")
        if self.batch_key_splits < 0:
            raise ValueError(f"KernelConfig.batch_key_splits must be >= 0, got {self.batch_key_splits}")

    def batch_shape(self, gemm: str | None = None) -> BatchShape:
        """The batch shape a GEMM launches with: its own from batch_gemms, else the batch_* fields."""
        for name, shape in self.batch_gemms:
            if name == gemm:
                return BatchShape(*shape)
        return BatchShape(self.batch_rows, self.batch_tiles, self.batch_warps, self.batch_stages, self.batch_k_step,
                          self.batch_split_k)

    def key_splits_for(self, batch: int) -> int:
        """Programs per head over the keys for a batch of this many rows."""
        return self.batch_key_splits if batch > 1 and self.batch_key_splits else self.key_splits


class LaunchShape(NamedTuple):
    """How one GEMM launches: batch rows R and column tiles T per program, warps, pipeline stages, K per program
    (k_chunk), K per inner-loop iteration (k_step) and programs over K (splits)."""

    rows: int
    tiles: int
    warps: int
    stages: int
    k_chunk: int
    k_step: int
    splits: int


def shared_bytes(cfg: GemmConfig, rows: int, tiles: int, stages: int, epilogue: int, block_rows: int,
                 k_step: int | None = None, element_bytes: int = 2) -> int:
    """Shared memory of one GEMM program: `stages` + 1 buffers of one K step's activation tile (R x BM rows x BK)
    and weight tile (BK x T column tiles; twice for the paired epilogues' lo and hi halves), in elements of the
    compute dtype (BK: `k_step`, default the GEMM's own). For bf16 this matches, to the byte, the four requirements
    Triton 3.6 reported when such shapes failed to launch on an H100 (docs/benchmarks.md §48); FP8 weights take
    less, so for them it errs on the safe side."""
    step = k_step or cfg.step
    paired = epilogue != EPI_RESIDUAL
    columns = tiles * (cfg.block_n // 2 if paired else cfg.block_n)
    per_stage = rows * block_rows * step + step * columns * (2 if paired else 1)
    return (stages + 1) * per_stage * element_bytes


def launch_shape(config: KernelConfig, cfg: GemmConfig, tiles: int, epilogue: int, head_dim: int,
                 batch: int, block_rows: int = 64, shared_limit: int | None = None, splits: int = 1,
                 element_bytes: int = 2, gemm: str | None = None) -> LaunchShape:
    """How a GEMM of `tiles` column tiles, packed in `splits` K chunks of cfg.k_chunk, launches over `batch` rows.
    Batch 1 runs R = T = 1 with the GEMM's own warps, stages, K step and split. A batch takes the config's batch
    shape for this GEMM (`gemm`, one of GEMM_NAMES: its own from batch_gemms, else the batch_* fields): R up to the
    batch (rounded to a power of two), T fitted to the tiles (for qkv to one head's tiles: its epilogue is per
    head), the batch K step, and one program over the whole K unless it splits K. With
    `shared_limit` (bytes a program may take on the device; `element_bytes` per element of the compute dtype), a
    shape that would not fit gives up pipeline stages (down to 2), then column tiles, then rows, instead of failing
    to launch."""
    k_chunk = cfg.k_chunk
    if batch == 1:
        rows, per_program, warps, stages, step = 1, 1, cfg.num_warps, cfg.stages, cfg.step
    else:
        shape = config.batch_shape(gemm)
        rows = min(shape.rows, 1 << (batch - 1).bit_length())
        limit = (head_dim // 2) // (cfg.block_n // 2) if epilogue == EPI_QKV else tiles  # qkv: pair tiles per head
        per_program = shape.tiles
        while per_program > 1 and (limit % per_program or tiles % per_program):
            per_program //= 2
        warps, stages = shape.warps, shape.stages
        if not shape.split_k:
            k_chunk, splits = k_chunk * splits, 1
        step = min(shape.k_step or cfg.step, k_chunk)
    while shared_limit is not None and shared_bytes(cfg, rows, per_program, stages, epilogue, block_rows,
                                                    step, element_bytes) > shared_limit:
        if stages > 2:
            stages -= 1
        elif per_program > 1:
            per_program //= 2
        elif rows > 1:
            rows //= 2
        else:
            break  # one row, one tile, 2 stages: the launch reports what is missing
    return LaunchShape(rows, per_program, warps, stages, k_chunk, step, splits)


def _pow2_at_most(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(n, cap):
        p *= 2
    return p


def fit_config(cfg: GemmConfig, n_pairs: int | None, k: int) -> GemmConfig:
    """Shrink a tile shape to a small layer's dimensions (powers of two; a pair half must divide `n_pairs`)."""
    block_n = cfg.block_n
    if n_pairs is not None:
        half = block_n // 2
        while half > 1 and n_pairs % half:
            half //= 2
        if half < 16:
            raise ValueError(f"{n_pairs} columns cannot be split into pair tiles of 16 or more (tl.dot's minimum)")
        block_n = 2 * half
    k_chunk = min(cfg.k_chunk, max(16, _pow2_at_most(k, cfg.k_chunk)))
    k_step = min(cfg.step, k_chunk)
    return dataclasses.replace(cfg, block_n=block_n, k_chunk=k_chunk, k_step=k_step)


def gemm_configs(config: KernelConfig, width: int, heads: int, head_dim: int, mlp: int) -> dict[str, GemmConfig]:
    """The four GEMMs' tile shapes fitted to an expert of these dimensions, in launch order."""
    return {"qkv": fit_config(config.qkv, head_dim // 2, width),
            "o": fit_config(config.o, None, heads * head_dim),
            "gate_up": fit_config(config.gate_up, mlp, width),
            "down": fit_config(config.down, None, mlp)}


def paired_columns(kind: int, tile: int, half_block: int, head_dim: int, mlp: int) -> list[int]:
    """Original output columns held by a paired tile: its first half, then their partners."""
    if kind == EPI_QKV:
        half = head_dim // 2
        per_head = half // half_block
        lo = (tile // per_head) * head_dim + (tile % per_head) * half_block
        return [*range(lo, lo + half_block), *range(lo + half, lo + half + half_block)]
    lo = tile * half_block
    return [*range(lo, lo + half_block), *range(mlp + lo, mlp + lo + half_block)]


@dataclass
class PackedLinear:
    """One GEMM's weight as [tiles, S, KC, BN] blocks (each program reads one contiguous block)."""

    blocks: Tensor
    scale: Tensor | None  # per output column (original order), for FP8 weights
    n: int
    k: int
    cfg: GemmConfig

    @property
    def tiles(self) -> int:
        return self.blocks.shape[0]

    @property
    def splits(self) -> int:
        return self.blocks.shape[1]


def pack_linear(weight: Tensor, kind: int, cfg: GemmConfig, head_dim: int = 0, mlp: int = 0,
                fp8: bool = False) -> PackedLinear:
    """weight [N, K] (torch Linear layout) -> PackedLinear; FP8 weights get one scale per output column."""
    n, k = weight.shape
    w = weight.float()
    scale = None
    if fp8:
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        w = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    kc, bn = cfg.k_chunk, cfg.block_n
    splits = -(-k // kc)
    wt = torch.zeros(splits * kc, n, dtype=torch.float32, device=w.device)
    wt[:k] = w.t()
    if kind == EPI_RESIDUAL:
        tiles = -(-n // bn)
        cols = torch.zeros(tiles * bn, splits * kc, device=w.device)
        cols[:n] = wt.t()
        blocks = cols.view(tiles, bn, splits, kc).permute(0, 2, 3, 1)
    else:
        pairs = n // 2 if kind == EPI_GEGLU else (n // head_dim) * (head_dim // 2)
        tiles = pairs // (bn // 2)
        order = [c for t in range(tiles) for c in paired_columns(kind, t, bn // 2, head_dim, mlp)]
        blocks = wt[:, order].view(splits, kc, tiles, bn).permute(2, 0, 1, 3)
    dtype = torch.float8_e4m3fn if fp8 else weight.dtype
    return PackedLinear(blocks.contiguous().to(dtype), scale, n, k, cfg)


def unpack_weight(p: PackedLinear, kind: int, head_dim: int = 0, mlp: int = 0) -> Tensor:
    """The [N, K] float32 weight a PackedLinear computes with (FP8 rounding and scales included)."""
    tiles, splits, kc, bn = p.blocks.shape
    blocks = p.blocks.float()
    if kind == EPI_RESIDUAL:
        w = blocks.permute(0, 3, 1, 2).reshape(tiles * bn, splits * kc)[: p.n, : p.k]
    else:
        order = [c for t in range(tiles) for c in paired_columns(kind, t, bn // 2, head_dim, mlp)]
        wt = blocks.permute(1, 2, 0, 3).reshape(splits * kc, tiles * bn)
        w = torch.empty(p.n, splits * kc, device=wt.device)
        w[order] = wt.t()
        w = w[:, : p.k]
    return w * p.scale[:, None] if p.scale is not None else w


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class ExpertLayerWeights:
    qkv: PackedLinear
    o: PackedLinear
    gate_up: PackedLinear
    down: PackedLinear


def _rows(t: Tensor, dims: int) -> Tensor:
    """`t` with a leading batch dimension: one row's tensor of `dims - 1` dimensions becomes a batch of one."""
    return t if t.dim() == dims else t.unsqueeze(0)


class ExpertKernels:
    """The action expert's denoise loop on the fused kernels; `denoise` has `FastModel.denoise`'s contract.

    Batches of up to `max_batch` rows run through the same launches (one more grid dimension): every row has its
    own residual stream, K/V cache and prefix length, and all rows share the step's weights and schedule.

    `fp8` selects the GEMMs whose weights are stored as FP8 e4m3 with one scale per output column
    (weight-only: activations stay in the compute dtype, the GEMM upcasts each weight block in registers).
    """

    def __init__(self, fast, config: KernelConfig | None = None, fp8: tuple[str, ...] = (),
                 compute_dtype: torch.dtype | None = None, max_batch: int = 1) -> None:
        if triton is None:
            raise RuntimeError("Triton is not installed; the fused expert kernels cannot run")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fast = fast
        cfg = fast.cfg
        e = cfg.expert
        self.heads, self.head_dim, self.width, self.mlp = e.num_heads, e.head_dim, e.width, e.mlp_dim
        self.eps = e.rms_norm_eps
        self.horizon = cfg.action_horizon
        self.max_batch = max_batch
        self.dtype = compute_dtype or fast.dtype
        self.device = fast.pos_embed.device
        self.config = config or KernelConfig()
        on_gpu = self.device.type == "cuda"
        # the most shared memory a program may take here (Triton's own launch check); none under the interpreter
        self.shared_limit = (triton.runtime.driver.active.utils.get_device_properties(
            self.device.index if self.device.index is not None else torch.cuda.current_device())["max_shared_mem"]
            if on_gpu else None)
        self.use_pdl = bool(self.config.pdl and on_gpu and torch.cuda.get_device_capability(self.device) >= (9, 0))
        if on_gpu and torch.cuda.get_device_capability(self.device) < (8, 9):
            fp8 = ()  # no FP8 conversions below Ada
        self.fp8 = fp8
        self.cfg_qkv, self.cfg_o, self.cfg_gate_up, self.cfg_down = gemm_configs(
            self.config, self.width, self.heads, self.head_dim, self.mlp).values()
        self.layers = []
        for block in fast.expert_blocks:
            self.layers.append(ExpertLayerWeights(
                qkv=pack_linear(self._weight(block.qkv), EPI_QKV, self.cfg_qkv, self.head_dim, fp8="qkv" in fp8),
                o=pack_linear(self._weight(block.out), EPI_RESIDUAL, self.cfg_o, fp8="o" in fp8),
                gate_up=pack_linear(self._weight(block.gate_up), EPI_GEGLU, self.cfg_gate_up, mlp=self.mlp,
                                    fp8="gate_up" in fp8),
                down=pack_linear(self._weight(block.down), EPI_RESIDUAL, self.cfg_down, fp8="down" in fp8),
            ))
        self._allocate()

    def _weight(self, linear) -> Tensor:
        """A FastModel Linear's weight in the compute dtype (dequantized if it was made FP8)."""
        w = linear.weight
        if linear.w_scale is not None:
            w = w.float() * linear.w_scale
        return w.to(self.dtype)

    def lane(self) -> ExpertKernels:
        """These kernels over the same packed weights, with workspaces of their own (Pi05Pipeline.lane)."""
        other = copy.copy(self)
        other._allocate()
        return other

    def _allocate(self) -> None:
        """Every buffer the launches write, with room for max_batch rows (a batch uses the first rows)."""
        dev, f32, rows = self.device, torch.float32, self.max_batch
        bm = self.block_rows
        first = self.layers[0]
        # split-K partials and counters per (row group, tile group): as many row slots as the row groups hold; a
        # GEMM without split K has none
        def workspace(name: str, p: PackedLinear) -> tuple[Tensor, Tensor]:
            shape = self.config.batch_shape(name)
            slots = -(-rows // shape.rows) * shape.rows if rows > 1 else 1
            if p.splits < 2:
                return torch.zeros(1, dtype=f32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
            return (torch.zeros(slots * p.tiles * p.splits * bm * p.cfg.block_n, dtype=f32, device=dev),
                    torch.zeros(slots * p.tiles, dtype=torch.int32, device=dev))

        self.ws = {name: workspace(name, p) for name, p in vars(first).items()}
        self.q = torch.zeros(rows, self.heads, bm, self.head_dim, dtype=self.dtype, device=dev)
        splits = max(self.config.key_splits, self.config.batch_key_splits)
        self.part_acc = torch.zeros(rows * self.heads * splits * bm * self.head_dim, dtype=f32, device=dev)
        self.part_m = torch.zeros(rows * self.heads * splits * bm, dtype=f32, device=dev)
        self.part_l = torch.zeros_like(self.part_m)
        self.attn = torch.zeros(rows, bm, self.heads * self.head_dim, dtype=self.dtype, device=dev)
        self.h = torch.zeros(rows, bm, self.mlp, dtype=self.dtype, device=dev)
        # The modulated GEMM input x * (1 + scale) and partial sums of squares of x, one row per column tile of
        # its producer (the o / down GEMMs, or the step's first modulate kernel).
        self.xm = torch.zeros(rows, bm, self.width, dtype=self.dtype, device=dev)
        self.modulate_cols = min(128, triton.next_power_of_2(self.width))
        tiles = max(first.o.tiles, first.down.tiles, triton.cdiv(self.width, self.modulate_cols))
        self.ssp = [torch.zeros(rows, tiles, bm, dtype=f32, device=dev) for _ in range(2)]
        self._dummy = torch.zeros(1, dtype=f32, device=dev)
        # the step's residual stream
        self.x_step = torch.zeros(rows, self.horizon, self.width, dtype=f32, device=dev)

    @property
    def block_rows(self) -> int:
        return max(16, triton.next_power_of_2(self.horizon))

    @property
    def _dt(self):
        return tl_dtype(self.dtype)

    def _check_batch(self, batch: int) -> int:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a batch of {batch} rows; these kernels were built for 1..{self.max_batch}")
        return batch

    # --- per step schedule: the adaRMS shifts' products, precomputed

    @torch.no_grad()
    def schedule(self, schedule: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        """FastModel.step_schedule's tuple + (shift1 @ Wqkv^T [S, L, Nqkv], shift2 @ Wgu^T [S, L, 2*MLP])."""
        mods = schedule[0]
        bias_qkv, bias_gu = [], []
        for i, layer in enumerate(self.layers):
            w_qkv = unpack_weight(layer.qkv, EPI_QKV, self.head_dim)
            w_gu = unpack_weight(layer.gate_up, EPI_GEGLU, mlp=self.mlp)
            bias_qkv.append(mods[:, i, 1].float() @ w_qkv.t())
            bias_gu.append(mods[:, i, 4].float() @ w_gu.t())
        return (*schedule, torch.stack(bias_qkv, 1).contiguous(), torch.stack(bias_gu, 1).contiguous())

    # --- launches

    def _launch_kwargs(self, warps: int) -> dict:
        kw = {"num_warps": warps}
        if self.device.type == "cuda":
            kw["launch_pdl"] = self.use_pdl
        return kw

    def launch_shape(self, p: PackedLinear, epilogue: int, batch: int, gemm: str | None = None) -> LaunchShape:
        """`launch_shape` of one of these GEMMs (`gemm`: its name, for its own batch shape) over `batch` rows."""
        return launch_shape(self.config, p.cfg, p.tiles, epilogue, self.head_dim, batch, self.block_rows,
                            self.shared_limit, p.splits, self.dtype.itemsize, gemm)

    def _gemm(self, name: str, p: PackedLinear, epilogue: int, batch: int, a: Tensor, out: Tensor, *,
              ssp_in: tuple[Tensor, int] | None = None, bias: Tensor | None = None, gate: Tensor | None = None,
              next_mod: Tensor | None = None, ssp_out: Tensor | None = None, k_cache: Tensor | None = None,
              v_cache: Tensor | None = None, n_valid: Tensor | None = None) -> None:
        """One GEMM over `batch` rows: `a` [B, BM, K], `out` [B, ...] (q [B, heads, BM, D], or rows [B, M, N]),
        k_cache / v_cache [B, rows, D]."""
        ws, count = self.ws[name]
        d = self._dummy
        qkv = epilogue == EPI_QKV
        ss_bstride = self.ssp[0].stride(0)
        rows, tiles, warps, stages, k_chunk, k_step, splits = self.launch_shape(p, epilogue, batch, name)
        _expert_gemm_kernel[(triton.cdiv(batch, rows), p.tiles // tiles, splits)](
            a, a.stride(1), a.stride(0),
            p.blocks, d if p.scale is None else p.scale,
            ws, count,
            d if ssp_in is None else ssp_in[0], 0 if ssp_in is None else ssp_in[1], ss_bstride,
            d if bias is None else bias, d if gate is None else gate,
            out, 0 if qkv else out.stride(1), out.stride(0),
            d if next_mod is None else next_mod, self.xm, self.xm.stride(0), d if ssp_out is None else ssp_out,
            k_cache if qkv else d, v_cache if qkv else d, k_cache.stride(0) if qkv else 0,
            self.fast.rope_cos if qkv else d, self.fast.rope_sin if qkv else d, n_valid if qkv else d,
            k_cache.shape[1] - self.horizon if qkv else 0,
            batch, self.horizon, p.k, p.n, self.eps,
            HEADS=self.heads, HEAD_DIM=self.head_dim, MLP=self.mlp,
            EPILOGUE=epilogue, NEXT=next_mod is not None, W_FP8=p.scale is not None, DT=self._dt,
            BM=self.block_rows, BN=p.cfg.block_n, KC=k_chunk, BK=k_step, S=splits,
            R=rows, T=tiles, STAGES=stages, PREFETCH=p.cfg.prefetch, USE_PDL=self.use_pdl,
            **self._launch_kwargs(warps),
        )

    def modulate(self, x: Tensor, next_mod: Tensor) -> tuple[Tensor, int]:
        """A step's first layer input: x [B, H, W] (or one row [H, W]) * next_mod into self.xm, partial sums of
        squares into ssp[1]."""
        x = _rows(x, 3)
        batch = self._check_batch(x.shape[0])
        tiles = triton.cdiv(self.width, self.modulate_cols)
        _modulate_kernel[(batch, tiles)](x, x.stride(0), next_mod, self.xm, self.xm.stride(0), self.ssp[1],
                                         self.ssp[1].stride(0), self.horizon, self.width, BM=self.block_rows,
                                         BN=self.modulate_cols, DT=self._dt, **self._launch_kwargs(4))
        return self.ssp[1], tiles

    def step_in(self, x_t: Tensor, next_mod: Tensor) -> tuple[Tensor, tuple[Tensor, int]]:
        """x = action_in(x_t) into self.x_step, x * next_mod into self.xm, partial sums of squares into ssp[1];
        x_t [B, H, action_dim] contiguous. Returns the batch's rows of x_step."""
        fast = self.fast
        batch = self._check_batch(x_t.shape[0])
        tiles = triton.cdiv(self.width, self.modulate_cols)
        a = fast.action_in_w.shape[1]
        _step_in_kernel[(batch, tiles)](x_t, fast.action_in_w, fast.action_in_b, self.x_step, next_mod, self.xm,
                                        self.xm.stride(0), self.ssp[1], self.ssp[1].stride(0), self.horizon,
                                        self.width, a, BM=self.block_rows, BN=self.modulate_cols,
                                        BA=max(16, triton.next_power_of_2(a)), DT=self._dt, USE_PDL=self.use_pdl,
                                        **self._launch_kwargs(4))
        return self.x_step[:batch], (self.ssp[1], tiles)

    def _attention(self, batch: int, k_cache: Tensor, v_cache: Tensor, n_valid: Tensor) -> None:
        c = self.config
        keys_total = k_cache.shape[1]
        key_splits = c.key_splits_for(batch)
        _attend_kernel[(batch, self.heads, key_splits)](
            self.q, self.q.stride(0), k_cache, v_cache, k_cache.stride(0), n_valid, self.part_acc, self.part_m,
            self.part_l, self.horizon, keys_total, self.horizon, self.head_dim**-0.5,
            S_K=key_splits, D=self.head_dim, BM=self.block_rows, KB=c.key_block, DT=self._dt,
            USE_PDL=self.use_pdl, **self._launch_kwargs(c.attend_warps),
        )
        bd = min(c.combine_cols, self.head_dim)
        grid = (batch * self.heads, triton.cdiv(self.horizon, c.combine_rows), self.head_dim // bd)
        _combine_kernel[grid](
            self.part_acc, self.part_m, self.part_l, self.attn, self.attn.stride(1), self.attn.stride(0),
            self.horizon, self.heads, S_K=key_splits, D=self.head_dim, BM=self.block_rows, BR=c.combine_rows,
            BD=bd, DT=self._dt, USE_PDL=self.use_pdl, **self._launch_kwargs(4),
        )

    def layer(self, x: Tensor, layer: int, mod: Tensor, next_mod: Tensor | None, bias_qkv: Tensor, bias_gu: Tensor,
              k_cache: Tensor, v_cache: Tensor, n_valid: Tensor, ssp_in: tuple[Tensor, int]) -> tuple[Tensor, int]:
        """One expert layer in place on x [B, horizon, width] (float32, rows contiguous); k_cache/v_cache
        [B, rows, head_dim], n_valid [B]. One row may come without its batch dimension (x [horizon, width],
        caches [rows, head_dim], n_valid a scalar tensor).

        Expects self.xm = x * mod[0] and `ssp_in` (partial sums of squares of x, count) from the previous
        kernel; leaves self.xm = x * next_mod and returns the new partials (when next_mod is given).
        """
        x, k_cache, v_cache = _rows(x, 3), _rows(k_cache, 3), _rows(v_cache, 3)
        batch = self._check_batch(x.shape[0])
        if n_valid.numel() < batch:
            raise ValueError(f"n_valid has {n_valid.numel()} entries for a batch of {batch}")
        if x.stride(1) != self.width or k_cache.stride(1) != self.head_dim or v_cache.stride() != k_cache.stride():
            raise ValueError("the kernels need x's and the caches' rows contiguous, and K and V laid out alike")
        w = self.layers[layer]
        self._gemm("qkv", w.qkv, EPI_QKV, batch, self.xm, self.q, ssp_in=ssp_in, bias=bias_qkv, k_cache=k_cache,
                   v_cache=v_cache, n_valid=n_valid)
        self._attention(batch, k_cache, v_cache, n_valid)
        self._gemm("o", w.o, EPI_RESIDUAL, batch, self.attn, x, gate=mod[2], next_mod=mod[3], ssp_out=self.ssp[0])
        self._gemm("gate_up", w.gate_up, EPI_GEGLU, batch, self.xm, self.h, ssp_in=(self.ssp[0], w.o.tiles),
                   bias=bias_gu)
        self._gemm("down", w.down, EPI_RESIDUAL, batch, self.h, x, gate=mod[5], next_mod=next_mod,
                   ssp_out=self.ssp[1])
        return self.ssp[1], w.down.tiles

    def denoise(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor],
                schedule: tuple[Tensor, ...]) -> None:
        """All Euler steps in place on x_t [B, H, action_dim]; `schedule` from `self.schedule(...)`."""
        mods, final_mods, out_w, out_b, bias_qkv, bias_gu = schedule
        for step in range(mods.shape[0]):
            self.denoise_step(x_t, n_valid, keys, values, mods[step], final_mods[step], out_w, out_b,
                              bias_qkv[step], bias_gu[step])

    def denoise_step(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor], mods: Tensor,
                     final_mod: Tensor, out_w: Tensor, out_b: Tensor, bias_qkv: Tensor, bias_gu: Tensor) -> None:
        """One Euler step in place on x_t [B, H, action_dim] (contiguous) with K/V caches [B, 1, rows, D] per
        layer and n_valid [B]: this step's rows of the schedule (mods [L, 6, W], final_mod [2, W],
        bias_qkv [L, Nqkv], bias_gu [L, 2*MLP]) and the dt-folded action head."""
        fast = self.fast
        depth = len(self.layers)
        if self.config.fused_step_in:
            x, ssp = self.step_in(x_t, mods[0, 0])
        else:
            x = torch.nn.functional.linear(x_t, fast.action_in_w, fast.action_in_b)
            ssp = self.modulate(x, mods[0, 0])
        for i in range(depth):
            next_mod = mods[i + 1, 0] if i + 1 < depth else None
            ssp = self.layer(x, i, mods[i], next_mod, bias_qkv[i], bias_gu[i], keys[i][:, 0], values[i][:, 0],
                             n_valid, ssp)
        fast._action_head(x_t, x, final_mod, out_w, out_b, fast.expert_eps)


# ------------------------------------------------------------------------------------------------ torch definition


def _rope_torch(y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = y.shape[-1] // 2
    return y * cos + torch.cat([-y[..., half:], y[..., :half]], dim=-1) * sin


def expert_layer_torch(x: Tensor, mod: Tensor, bias_qkv: Tensor, bias_gu: Tensor, w_qkv: Tensor, w_o: Tensor,
                       w_gu: Tensor, w_down: Tensor, k_cache: Tensor, v_cache: Tensor, n_valid: int,
                       cos_table: Tensor, sin_table: Tensor, heads: int, head_dim: int, eps: float,
                       dtype: torch.dtype) -> Tensor:
    """What one `ExpertKernels.layer` computes, in plain torch: x [M, W] float32 -> new x; writes the cache's
    last M rows. Weights [N, K] float32 (as the kernels compute with them); `dtype` is the GEMM input dtype."""
    m, width = x.shape
    rows = k_cache.shape[0]

    def gemm(a: Tensor, w: Tensor) -> Tensor:
        return a.to(dtype).float() @ w.to(dtype).float().t()

    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = r * gemm(x * mod[0], w_qkv) + bias_qkv
    q_width = heads * head_dim
    pos = n_valid + torch.arange(m, device=x.device)
    cos, sin = cos_table[pos], sin_table[pos]
    q = _rope_torch(y[:, :q_width].view(m, heads, head_dim), cos[:, None], sin[:, None]).to(dtype)
    k_cache[rows - m:] = _rope_torch(y[:, q_width:q_width + head_dim], cos, sin).to(k_cache.dtype)
    v_cache[rows - m:] = y[:, q_width + head_dim:].to(v_cache.dtype)
    idx = torch.arange(rows, device=x.device)
    valid = (idx < n_valid) | (idx >= rows - m)
    scores = (q.float().reshape(m * heads, head_dim) @ k_cache.float().t()) * head_dim**-0.5
    probs = scores.masked_fill(~valid[None], float("-inf")).softmax(-1)
    attn = (probs.to(dtype).float() @ v_cache.float()).view(m, q_width)
    x = x + gemm(attn, w_o) * mod[2]
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    gate, up = (r * gemm(x * mod[3], w_gu) + bias_gu).chunk(2, dim=-1)
    h = torch.nn.functional.gelu(gate, approximate="tanh") * up
    return x + gemm(h, w_down) * mod[5]


def layer_weights_torch(kernels: ExpertKernels, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The float32 [N, K] weights `expert_layer_torch` needs for one layer of `kernels`."""
    w = kernels.layers[layer]
    return (unpack_weight(w.qkv, EPI_QKV, kernels.head_dim), unpack_weight(w.o, EPI_RESIDUAL),
            unpack_weight(w.gate_up, EPI_GEGLU, mlp=kernels.mlp), unpack_weight(w.down, EPI_RESIDUAL))


def interpreter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Triton's CPU interpreter computes bfloat16 wrongly (../shared/GPU.md): use float32 there."""
    return torch.float32 if interpreting() and dtype == torch.bfloat16 else dtype



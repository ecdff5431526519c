"""Gemma's FP8 MLP input half as one Triton kernel: the gate_up GEMM with GeGLU and the FP8 quantization of the
down GEMM's input in its epilogue, and its torch definition (`fp8_geglu_reference`).

The torch path (blocks.prefix_layer) runs the FP8 gate_up GEMM with a bf16 output [M, 2F], then one inductor kernel
reads that back to form gelu_tanh(gate) * up and quantize it for the FP8 down GEMM. At a batch of 8 the second pass
is 138 us per Gemma layer on an H100, 11% of the prefill, and 26 us (14%) at batch 1 (docs/benchmarks.md §63): it
moves 5 bytes per hidden element for no arithmetic. Here each program computes a tile of gate columns and the
matching tile of up columns (two accumulators over the same A tiles), applies the GELU and the product in float32,
and stores the hidden tile as FP8: the [M, 2F] bf16 intermediate never exists.

Scales are per tensor, as in `blocks.Linear.quantize_fp8`: `scale` = input scale x weight scale of gate_up (one
multiply of the float32 accumulators), `out_inv_scale` = 1 / the down GEMM's input scale. Numerics: the torch
path rounds gate and up to bf16 before the GELU; this kernel does not. And by default (`TileConfig.precise`
False) its sums stay in Hopper's FP8 MMA accumulator, which keeps fewer bits than float32, where `_scaled_mm`
adds into float32. So a hidden value near an e4m3 rounding boundary can land one e4m3 step away from the torch
path's (tests bound how many and how far; on an H100 3.3% of values differ from the float32 definition, 2.95% for
the torch path, docs/benchmarks.md §63). A K that is not a multiple of the K step compiles to a slower kernel
(masked loads, one pipeline stage); Gemma's 2048 is one.

`fp8_geglu` is a torch custom op, so the torch.compile'd prefix layer calls it as one opaque node.

The same kernel with one accumulator is SigLIP's FP8 fc1 (`fp8_linear_gelu`): fc1's GEMM, its bias, the tanh GELU
and the quantization of fc2's input in one pass. SigLIP's MLP in FP8 lost to bf16 at a batch of 8 (§63) because
the bf16 fc1 has the GELU in its cuBLASLt epilogue and the FP8 one had a GELU-and-quantize pass after it; this
removes that pass. `Pi05Pipeline` takes it wherever `fp8_vision` is on, on Hopper (`vision_fused_mlp=None`):
there it made a batch of 8's vision 0.3 ms faster than the bf16 MLP (H100, docs/benchmarks.md §70).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # importable without Triton; blocks.py takes this path only where it can run
    triton = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class TileConfig(NamedTuple):
    block_m: int
    block_n: int  # columns of gate (and as many of up) per program
    block_k: int
    warps: int
    stages: int
    group_m: int  # programs of GROUP_M row blocks walk the columns together: each weight tile is read once per group
    # Hopper's FP8 MMA accumulates in less than float32, and Triton's default on SM 9.0 never moves the sum into a
    # float32 register (cuBLAS's "fast accumulation"; `_scaled_mm` by default adds into float32). True: once per K
    # step, at the cost of registers (16 bytes of spills with Triton 3.9, none with 3.6 at the default tiles).
    precise: bool = False


# The fastest of `tools/geglu_gpu.py`'s sweep on an H100 at 528, 1056 and 4224 rows (batches of 1, 2 and 8), with
# Triton's default FP8 accumulation (docs/benchmarks.md §63); 64-row tiles were slower at every size. The
# float32-per-step option is in the sweep, not yet measured.
DEFAULT_CONFIG = TileConfig(block_m=128, block_n=128, block_k=128, warps=8, stages=3, group_m=8)


# SigLIP's fc1 (one accumulator, so twice the columns for the same registers): not yet measured on a GPU;
# tools/geglu_gpu.py --gelu sweeps it.
GELU_CONFIG = TileConfig(block_m=128, block_n=256, block_k=128, warps=8, stages=3, group_m=8)


def config_for(rows: int) -> TileConfig:  # noqa: ARG001 - one config measured best at every row count so far
    return DEFAULT_CONFIG


@functools.cache
def _kernel():
    """Defined at first use: whether Triton interprets it (TRITON_INTERPRET=1, tests on the CPU) is fixed when it
    is defined, and this module is imported with the fast path, before tests choose."""

    @triton.jit
    def _fp8_geglu_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, scale_ptr, out_inv_scale_ptr,
        M, K, F, x_stride, w_stride, out_stride,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
        OUT_FP8: tl.constexpr, PRECISE: tl.constexpr, GATED: tl.constexpr,
    ):
        """GATED: out[m, f] = fp8(clamp(gelu_tanh(gate) * up / s_out)), gate = (x @ w[f]^T) * s,
        up = (x @ w[F + f]^T) * s, for x [M, K] e4m3, w [2F, K] e4m3 (gate rows, then up rows: the torch Linear
        layout); bias_ptr is not read. Not GATED: out[m, f] = fp8(clamp(gelu_tanh(gate + bias[f]) / s_out)) for
        w [F, K], bias [F]."""
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BM)
        blocks_n = tl.cdiv(F, BN)
        in_group = GROUP_M * blocks_n
        first_m = (pid // in_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_rows
        pid_n = (pid % in_group) // group_rows
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row_ok = rm < M
        col_ok = rn < F
        x_ptrs = x_ptr + rm[:, None] * x_stride + rk[None, :]
        gate_ptrs = w_ptr + rn[None, :] * w_stride + rk[:, None]  # [BK, BN]: w's rows read K-major
        up_ptrs = gate_ptrs + F * w_stride
        acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                g = tl.load(gate_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = rk + k * BK < K
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if PRECISE:
                acc_gate = tl.dot(a, g, acc_gate, max_num_imprecise_acc=BK)
            else:
                acc_gate = tl.dot(a, g, acc_gate)
            if GATED:
                if EVEN_K:
                    u = tl.load(up_ptrs, mask=col_ok[None, :], other=0.0)
                else:
                    u = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if PRECISE:
                    acc_up = tl.dot(a, u, acc_up, max_num_imprecise_acc=BK)
                else:
                    acc_up = tl.dot(a, u, acc_up)
                up_ptrs += BK
            x_ptrs += BK
            gate_ptrs += BK
        scale = tl.load(scale_ptr)
        gate = acc_gate * scale
        if not GATED:
            gate += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
        # gelu_tanh(g) = g * sigmoid(2 sqrt(2 / pi) (g + 0.044715 g^3))
        hidden = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
        if GATED:
            hidden = hidden * (acc_up * scale)
        hidden = hidden * tl.load(out_inv_scale_ptr)
        hidden = tl.minimum(tl.maximum(hidden, -448.0), 448.0)  # FP8_MAX: kernels read no plain globals
        if OUT_FP8:
            hidden = hidden.to(tl.float8e4nv)
        tl.store(out_ptr + rm[:, None] * out_stride + rn[None, :], hidden, mask=row_ok[:, None] & col_ok[None, :])

    return _fp8_geglu_kernel


def fp8_geglu_reference(x: Tensor, weight: Tensor, scale: Tensor, out_inv_scale: Tensor) -> Tensor:
    """The kernel's definition in torch, float32 throughout: x [M, K] and weight [2F, K] e4m3 -> [M, F] e4m3."""
    y = (x.float() @ weight.float().t()) * scale.float()
    gate, up = y.chunk(2, dim=-1)
    hidden = F.gelu(gate, approximate="tanh") * up * out_inv_scale.float()
    return hidden.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def supported(device: torch.device) -> bool:
    """Where the kernel runs: a GPU with FP8 tensor cores (Ada, Hopper and later) and Triton, or the interpreter."""
    from pi05_ros.engine.fast.kernels import interpreting, triton_installed

    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and interpreting()


# The schema is spelled out: torch 2.4 cannot infer it from this module's string annotations.
@torch.library.custom_op("pi05::fp8_geglu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor scale, Tensor out_inv_scale) -> Tensor")
def fp8_geglu(x: Tensor, weight: Tensor, scale: Tensor, out_inv_scale: Tensor) -> Tensor:
    """x [M, K] e4m3 (the quantized, normalized MLP input), weight [2F, K] e4m3 (gate rows, then up rows), scale and
    out_inv_scale one-element float32 -> the down GEMM's e4m3 input [M, F]. `fp8_geglu_reference`'s contract."""
    return launch(x, weight, scale, out_inv_scale)


def launch(x: Tensor, weight: Tensor, scale: Tensor, out_inv_scale: Tensor, config: TileConfig | None = None,
           bias: Tensor | None = None) -> Tensor:
    """`fp8_geglu` with a chosen tile config (tools/geglu_gpu.py sweeps them); None: `config_for` the rows. With a
    `bias`, `fp8_linear_gelu` instead: weight [F, K], one accumulator, the bias before the GELU, no gating."""
    if triton is None:
        raise RuntimeError("fp8_geglu needs Triton; use the torch MLP path")
    fp8 = torch.float8_e4m3fn
    gated = bias is None
    op = "fp8_geglu" if gated else "fp8_linear_gelu"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or (gated and weight.shape[0] % 2):
        raise ValueError(f"{op}: x must be [M, K] and weight [{'2F' if gated else 'F'}, K], got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.dtype != fp8 or weight.dtype != fp8:
        raise ValueError(f"{op} takes float8_e4m3fn x and weight, got {x.dtype} and {weight.dtype}")
    if scale.numel() != 1 or out_inv_scale.numel() != 1:
        raise ValueError(f"{op}: scale and out_inv_scale are per-tensor (one element each)")
    if not gated and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must be [{weight.shape[0]}] (one per output column), got {tuple(bias.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError(f"{op} needs the weight's rows contiguous (the Linear layout)")
    m, k = x.shape
    f = weight.shape[0] // 2 if gated else weight.shape[0]
    # Triton 3.9's interpreter rounds float32 -> e4m3 wrongly where the rounding carries into the exponent (7.8 -> 4,
    # not 8): under it the kernel stores float32 and torch converts. On a GPU the kernel stores e4m3 itself.
    out_fp8 = x.is_cuda
    out = torch.empty(m, f, dtype=fp8 if out_fp8 else torch.float32, device=x.device)
    if m == 0:
        return out.to(fp8)
    cfg = config or (config_for(m) if gated else GELU_CONFIG)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(f, cfg.block_n),)
    launch_options = {"num_warps": cfg.warps, "num_stages": cfg.stages} if x.is_cuda else {}
    _kernel()[grid](
        x, weight, scale if gated else bias.contiguous(), out, scale.float().reshape(1),
        out_inv_scale.float().reshape(1), m, k, f, x.stride(0), weight.stride(0), out.stride(0),
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0,
        OUT_FP8=out_fp8, PRECISE=cfg.precise, GATED=gated, **launch_options,
    )
    return out if out_fp8 else out.to(fp8)


@fp8_geglu.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, out_inv_scale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def fp8_linear_gelu_reference(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor,
                              out_inv_scale: Tensor) -> Tensor:
    """`fp8_linear_gelu`'s definition in torch, float32 throughout: x [M, K], weight [F, K] e4m3, bias [F] ->
    [M, F] e4m3."""
    y = (x.float() @ weight.float().t()) * scale.float() + bias.float()
    hidden = F.gelu(y, approximate="tanh") * out_inv_scale.float()
    return hidden.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@torch.library.custom_op("pi05::fp8_linear_gelu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias, Tensor scale, Tensor out_inv_scale) -> Tensor")
def fp8_linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, out_inv_scale: Tensor) -> Tensor:
    """x [M, K] e4m3 (SigLIP's quantized, normalized MLP input), weight [F, K] e4m3 (fc1), bias [F], scale and
    out_inv_scale one-element float32 -> fc2's e4m3 input [M, F]. `fp8_linear_gelu_reference`'s contract."""
    return launch(x, weight, scale, out_inv_scale, bias=bias)


@fp8_linear_gelu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, out_inv_scale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float8_e4m3fn)

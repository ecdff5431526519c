"""The fast path's model: the reference weights re-packed for inference, and the math that uses them.

What changes against `engine/reference.py` (the math is the same function):
- norm scales are folded into the following linear: Gemma's `(1 + w)` and SigLIP's LayerNorm affine;
- q/k/v are one GEMM, gate/up one GEMM;
- the prefix's last layer computes only K/V (nothing reads its output);
- the expert's adaRMS (scale, shift, gate) and the time MLP depend only on t: they are computed once per step
  schedule, and the expert's `dense` weights are dropped; `dt` is folded into `action_out_proj`;
- the residual stream is float32, GEMM inputs bfloat16 or FP8 e4m3 (static per-tensor scales).

Everything here is plain PyTorch on preallocated tensors, so it runs eagerly on any device (tests compare
it with the reference on CPU) and can be captured into CUDA graphs by `engine/fast/pipeline.py`.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi05_ros.engine.config import Pi05Config
from pi05_ros.engine.fast.kernels.attention import flash_gqa_attention
from pi05_ros.engine.fast.kernels.geglu import fp8_geglu, fp8_linear_gelu
from pi05_ros.engine.reference import Pi05Model, euler_schedule
from pi05_ros.engine.rtc import guidance_weight_tensor

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_HEADROOM = 4.0

# (weight, bias, weight scale, input scale, 1 / input scale); the scales are None for a bf16 linear.
LinearParams = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]
LinearFn = Callable[[Tensor, LinearParams], Tensor]


def linear(x: Tensor, p: LinearParams) -> Tensor:
    """x W^T + b through a bf16 GEMM, or an FP8 e4m3 GEMM with per-tensor scales (bf16 out)."""
    weight, bias, w_scale, x_scale, x_inv_scale = p
    if w_scale is None:
        return F.linear(x.to(weight.dtype), weight, bias)
    if x.requires_grad:  # RTC's VJP: e4m3 GEMMs have no backward
        return _Fp8Linear.apply(x, weight, bias, w_scale, x_scale, x_inv_scale)
    return _fp8_linear(x, weight, bias, w_scale, x_scale, x_inv_scale)


def _fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, w_scale: Tensor, x_scale: Tensor,
                x_inv_scale: Tensor) -> Tensor:
    lead = x.shape[:-1]
    xq = (x.reshape(-1, x.shape[-1]).float() * x_inv_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16)
    return y.reshape(*lead, -1)


# The schema is spelled out: torch 2.4 cannot infer it from this module's string annotations.
@torch.library.custom_op("pi05::linear_gelu_tanh", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """gelu_tanh(x W^T + b), x [M, K]. On CUDA one cuBLASLt GEMM with its GELU epilogue (cuBLASLt's GELU is the tanh
    form, as ATen's own fallback for `_addmm_activation` says): SigLIP's fc1 loses its separate GELU kernel, the
    vision tower of a batch of 8 went 9.15 -> 7.71 ms on an H100 (docs/benchmarks.md §56). A custom op, so that
    inductor calls it as it is instead of splitting the bias and the GELU back out. Elsewhere the GEMM, then the GELU
    (the CPU's `_addmm_activation` is the erf GELU)."""
    if x.is_cuda:
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _mlp_hidden(h: Tensor, fc1: LinearParams, linear_fn: LinearFn) -> Tensor:
    """gelu_tanh(fc1(h)): a bf16 fc1 with a bias through `linear_gelu_tanh`; an FP8 fc1, or a routed linear (FP8
    calibration records, the emulator), as the linear and then the GELU."""
    weight, bias, w_scale = fc1[:3]
    if linear_fn is linear and w_scale is None and bias is not None:
        return linear_gelu_tanh(h.reshape(-1, h.shape[-1]).to(weight.dtype), weight, bias).view(*h.shape[:-1], -1)
    return F.gelu(linear_fn(h, fc1), approximate="tanh")


class _Fp8Linear(torch.autograd.Function):
    """The FP8 GEMM forward; backward to the input through the dequantized weight (the closest honest gradient:
    e4m3 rounding of the input has no derivative worth following)."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_scale, x_scale, x_inv_scale):  # noqa: ANN001, ANN205
        ctx.save_for_backward(weight, w_scale)
        ctx.x_dtype = x.dtype
        return _fp8_linear(x, weight, bias, w_scale, x_scale, x_inv_scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        weight, w_scale = ctx.saved_tensors
        w = (weight.float() * w_scale).to(torch.bfloat16)
        return (grad.to(torch.bfloat16) @ w).to(ctx.x_dtype), None, None, None, None, None


class Linear(nn.Module):
    """Holds one linear layer's tensors (bf16, or FP8 e4m3 after `quantize_fp8`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.w_scale = self.x_scale = self.x_inv_scale = None

    @property
    def params(self) -> LinearParams:
        return (self.weight, self.bias, self.w_scale, self.x_scale, self.x_inv_scale)

    def quantize_fp8(self, input_amax: float, headroom: float = FP8_HEADROOM) -> None:
        """Quantize the weight once; inputs will be scaled by a static amax from calibration.

        e4m3 is a floating-point format: scaling the calibrated amax up by `headroom` costs little precision
        (only the tiniest values reach subnormals) and keeps inputs larger than any seen in calibration from
        being clipped, which costs far more.
        """
        w = self.weight.float()
        w_scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
        self.weight = (w / w_scale).to(torch.float8_e4m3fn).contiguous()
        self.w_scale = w_scale.reshape(()).float()
        self.x_scale = torch.tensor(max(input_amax, 1e-6) * headroom / FP8_MAX, device=w.device)
        self.x_inv_scale = 1.0 / self.x_scale
        if self.bias is not None:
            self.bias = self.bias.to(torch.bfloat16)


def fp8_mlp_fused(h: Tensor, gate_up: LinearParams, down: LinearParams) -> Tensor:
    """down(gelu_tanh(gate) * up) for FP8 gate_up and down: the gate_up GEMM, the GeGLU and the quantization of
    down's input as one kernel (kernels/geglu.py), then down's FP8 GEMM. The same scales as `linear`'s two calls;
    gate_up without a bias (the kernel has none)."""
    w_gu, _, w_scale_gu, x_scale_gu, x_inv_scale_gu = gate_up
    w_down, bias_down, w_scale_down, x_scale_down, x_inv_scale_down = down
    lead = h.shape[:-1]
    xq = (h.reshape(-1, h.shape[-1]).float() * x_inv_scale_gu).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    hidden = fp8_geglu(xq, w_gu, x_scale_gu * w_scale_gu, x_inv_scale_down)
    y = torch._scaled_mm(hidden, w_down.t(), scale_a=x_scale_down, scale_b=w_scale_down, bias=bias_down,
                         out_dtype=torch.bfloat16)
    return y.reshape(*lead, -1)


def fp8_gelu_mlp_fused(h: Tensor, fc1: LinearParams, fc2: LinearParams) -> Tensor:
    """fc2(gelu_tanh(fc1(h))) for FP8 fc1 and fc2 (SigLIP's MLP): fc1's GEMM, bias, GELU and the quantization of
    fc2's input as one kernel (kernels/geglu.py `fp8_linear_gelu`), then fc2's FP8 GEMM. The same scales as
    `linear`'s two calls."""
    w1, bias1, w_scale1, x_scale1, x_inv_scale1 = fc1
    w2, bias2, w_scale2, x_scale2, x_inv_scale2 = fc2
    lead = h.shape[:-1]
    xq = (h.reshape(-1, h.shape[-1]).float() * x_inv_scale1).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    hidden = fp8_linear_gelu(xq, w1, bias1, x_scale1 * w_scale1, x_inv_scale2)
    y = torch._scaled_mm(hidden, w2.t(), scale_a=x_scale2, scale_b=w_scale2, bias=bias2, out_dtype=torch.bfloat16)
    return y.reshape(*lead, -1)


def _rms(x: Tensor, eps: float) -> Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x.float() * cos + rotated.float() * sin


def _gqa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """q [B, N, H, D] against one K/V head [B, 1, L, D] -> [B, N, H * D]; key_mask [B, 1, 1, L] bool (each row
    its own valid keys; [1, 1, 1, L] serves every row).

    With a single K/V head, every (token, head) query row is independent: folding the heads into the query
    rows gives one [N*H, D] x [D, L] problem, i.e. two plain GEMMs around a masked softmax that
    torch.compile fuses. At these sizes (<= 4.7k query rows, <= 1k keys) that beats the flash-style SDPA
    kernels, which parallelize over heads and query tiles and so leave most of the GPU idle with one KV head
    (measured in docs/benchmarks.md). Logits come out of the GEMM in the input dtype and the softmax runs in
    float32, as openpi's eager attention does.
    """
    b, n, h, d = q.shape
    if b == 1:
        # 2-D products: cuBLAS picks its Hopper kernels for mm where a batch-1 bmm fell back to older ones.
        scores = torch.mm(q.reshape(n * h, d), k[0, 0].t()).float() * (d**-0.5)
        scores = scores.masked_fill(~key_mask.view(1, -1), float("-inf"))
        out = torch.mm(scores.softmax(dim=-1).to(v.dtype), v[0, 0])
        return out.reshape(b, n, h * d)
    scores = torch.bmm(q.reshape(b, n * h, d), k[:, 0].transpose(1, 2)).float() * (d**-0.5)
    scores = scores.masked_fill(~key_mask.reshape(key_mask.shape[0], 1, -1), float("-inf"))
    return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v[:, 0]).reshape(b, n, h * d)


def _gqa_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """The same through PyTorch SDPA (cuDNN / memory-efficient kernels), kept to compare against."""
    b, n, h, d = q.shape
    out = F.scaled_dot_product_attention(q.reshape(b, 1, n * h, d), k, v, attn_mask=key_mask)
    return out.reshape(b, n, h * d)


def _gqa_attention_flash(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """The same as one flash-style Triton kernel (kernels/attention.py): the scores never reach memory. CUDA with
    Triton, or the CPU interpreter; not differentiable (real-time chunking's VJP takes "gemm")."""
    return flash_gqa_attention(q, k, v, key_mask)


ATTENTION = {"gemm": _gqa_attention, "sdpa": _gqa_attention_sdpa, "flash": _gqa_attention_flash}


def _fold_layernorm(ln: nn.LayerNorm, lin: nn.Linear) -> tuple[Tensor, Tensor]:
    """lin(LN(x)) = lin'(normalize(x)) with W' = W * gamma, b' = b + W @ beta (in float32)."""
    w = lin.weight.float()
    bias = lin.bias.float() if lin.bias is not None else torch.zeros(w.shape[0], device=w.device)
    return w * ln.weight.float()[None, :], bias + w @ ln.bias.float()


# --- the layer functions: pure over tensors, so one torch.compile serves every layer of a stack.
# Each takes `linear_fn` (default `linear`): FastModel.linears_through routes every linear layer through a
# recorder or an emulator that way, and the hot `linear` itself checks nothing.


def embed_patches(images_u8: Tensor, weight: Tensor, bias: Tensor, pos_embed: Tensor, patch: int) -> Tensor:
    """uint8 images [N, H, W, C] -> patch embeddings + positions [N, (H/p)(W/p), width], float32.

    SigLIP's patch convolution (kernel = stride = p) is a GEMM over flattened patches, weight [width, C*p*p] in
    (channel, row, column) order: the patch gather and the [-1, 1] scaling fuse into one kernel before cuBLAS, where
    cuDNN's convolution of a 3-channel image ran at ~30 TFLOP/s with a channel-padding kernel of its own (an H100,
    docs/benchmarks.md §51)."""
    n, height, width, channels = images_u8.shape
    rows, cols = height // patch, width // patch
    x = images_u8.view(n, rows, patch, cols, patch, channels).permute(0, 1, 3, 5, 2, 4)
    x = (x.reshape(n * rows * cols, channels * patch * patch).float() / 255.0 * 2.0 - 1.0).to(weight.dtype)
    return F.linear(x, weight, bias).view(n, rows * cols, -1).float() + pos_embed


def vision_head(x: Tensor, projector: LinearParams, eps: float, linear_fn: LinearFn = linear,
                carry: Tensor | None = None) -> Tensor:
    """SigLIP's final LayerNorm (affine folded into the projector) and the projection to Gemma's width; `carry`:
    the last layer's MLP output, added here (see `vision_layer`)."""
    if carry is not None:
        x = x + carry.float()
    return linear_fn(F.layer_norm(x, (x.shape[-1],), eps=eps), projector)


def vision_layer(x: Tensor, qkv: LinearParams, out: LinearParams, fc1: LinearParams, fc2: LinearParams,
                 num_heads: int, eps: float, linear_fn: LinearFn = linear, fused_mlp: bool = False,
                 carry: Tensor | None = None, defer: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """A SigLIP layer over x [B, N, W] (LayerNorms' affine folded into qkv and fc1). `fused_mlp`: an MLP whose fc1
    and fc2 are both FP8 runs through `fp8_gelu_mlp_fused` (where kernels.geglu.supported; the caller decides).

    Residual carry (FastModel.carry_residual; Pi05Pipeline's default): with `defer` the layer returns (x, its MLP
    output) instead of their sum, and the next layer takes that output as `carry` and adds it first, where the add
    fuses into its first norm's kernel: one pass over the float32 residual stream less per layer. The same additions
    in the same order: eagerly equal bit for bit; compiled, the fused norm may sum its squares in another order
    (5e-4 apart in bf16 through inductor on the CPU, tools/batch_stages_gpu.py --device cpu).
    """
    if carry is not None:
        x = x + carry.float()
    b, n, width = x.shape
    h = F.layer_norm(x, (width,), eps=eps)
    q, k, v = linear_fn(h, qkv).view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
    x = x + linear_fn(attn, out).float()
    h = F.layer_norm(x, (width,), eps=eps)
    if fused_mlp and linear_fn is linear and fc1[2] is not None and fc2[2] is not None and fc1[1] is not None:
        y = fp8_gelu_mlp_fused(h, fc1, fc2)
    else:
        y = linear_fn(_mlp_hidden(h, fc1, linear_fn), fc2)
    return (x, y) if defer else x + y.float()


def prefix_layer(x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k_cache: Tensor, v_cache: Tensor,
                 qkv: LinearParams, out: LinearParams | None, gate_up: LinearParams | None, down: LinearParams | None,
                 num_heads: int, head_dim: int, eps: float, attention: str = "gemm",
                 linear_fn: LinearFn = linear, fused_mlp: bool = False, carry: Tensor | None = None,
                 defer: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
    """A Gemma 2B layer over the packed prefix x [B, N, W]; `out` None = K/V only (the last layer).
    `fused_mlp`: an MLP whose gate_up and down are both FP8 runs through `fp8_mlp_fused` (where
    kernels.geglu.supported; the caller decides). `carry` / `defer`: the residual carry of `vision_layer` (a K/V-only
    layer defers None).

    Its K/V go into the first N rows of k_cache/v_cache [B, 1, C, D], and attention runs over all C rows with
    key_mask [B, 1, 1, C]: the key length stays fixed whatever the prompt length, so one compiled kernel set
    serves every N. Every row's valid tokens come first, so the rows share positions (cos/sin [N, D]).
    """
    if carry is not None:
        x = x + carry.float()
    b, n, _ = x.shape
    d = head_dim
    y = linear_fn(_rms(x, eps), qkv)
    kv = y[..., -2 * d:]
    k_cache[:, :, :n].copy_(_rope(kv[..., :d], cos, sin).unsqueeze(1))
    v_cache[:, :, :n].copy_(kv[..., d:].unsqueeze(1))
    if out is None:
        return (x, None) if defer else x
    q = _rope(y[..., : num_heads * d].view(b, n, num_heads, d), cos.unsqueeze(-2), sin.unsqueeze(-2))
    q = q.to(k_cache.dtype)
    x = x + linear_fn(ATTENTION[attention](q, k_cache, v_cache, key_mask), out).float()
    # (the kernel has no bias: Gemma's gate_up has none)
    if fused_mlp and linear_fn is linear and gate_up[2] is not None and down[2] is not None and gate_up[1] is None:
        y = fp8_mlp_fused(_rms(x, eps), gate_up, down)
    else:
        gate, up = linear_fn(_rms(x, eps), gate_up).chunk(2, dim=-1)
        y = linear_fn(F.gelu(gate, approximate="tanh") * up, down)
    return (x, y) if defer else x + y.float()


def expert_layer(x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k_cache: Tensor,
                 v_cache: Tensor, qkv: LinearParams, out: LinearParams, gate_up: LinearParams, down: LinearParams,
                 num_heads: int, head_dim: int, eps: float, attention: str = "gemm",
                 linear_fn: LinearFn = linear, carry: Tensor | None = None, carry_gate: Tensor | None = None,
                 defer: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """An action-expert layer over x [B, H, W]. mod [6, W]: (1+scale, shift, gate) of the attention norm, then of
    the MLP norm (one step for all rows). cos/sin [B, H, D]: each row's suffix positions follow its own prefix.

    The suffix's own K/V go into the last `horizon` rows of the cache, after the prefix's rows. `carry` / `defer`:
    the residual carry of `vision_layer`; the carried MLP output is added times its layer's gate (`carry_gate`).
    """
    if carry is not None:
        x = x + carry.float() * carry_gate
    b, n, _ = x.shape
    d = head_dim
    y = linear_fn(_rms(x, eps) * mod[0] + mod[1], qkv)
    q_width = num_heads * d
    k_cache[:, :, -n:].copy_(_rope(y[..., q_width:q_width + d], cos, sin).unsqueeze(1))
    v_cache[:, :, -n:].copy_(y[..., q_width + d:].unsqueeze(1))
    q = _rope(y[..., :q_width].view(b, n, num_heads, d), cos.unsqueeze(-2), sin.unsqueeze(-2)).to(k_cache.dtype)
    x = x + linear_fn(ATTENTION[attention](q, k_cache, v_cache, key_mask), out).float() * mod[2]
    gate, up = linear_fn(_rms(x, eps) * mod[3] + mod[4], gate_up).chunk(2, dim=-1)
    y = linear_fn(F.gelu(gate, approximate="tanh") * up, down)
    return (x, y) if defer else x + y.float() * mod[5]


def action_head(x_t: Tensor, x: Tensor, final_mod: Tensor, out_w: Tensor, out_b: Tensor, eps: float,
                carry: Tensor | None = None, carry_gate: Tensor | None = None) -> None:
    """Final adaptive norm, the (dt-folded) output projection and the Euler update, in place on x_t; `carry`: the
    last expert layer's MLP output and its gate, added first (see `expert_layer`)."""
    x_t.add_(action_delta(x, final_mod, out_w, out_b, eps, carry, carry_gate))


def action_delta(x: Tensor, final_mod: Tensor, out_w: Tensor, out_b: Tensor, eps: float,
                 carry: Tensor | None = None, carry_gate: Tensor | None = None) -> Tensor:
    """dt * v: the final adaptive norm and the dt-folded output projection (differentiable; RTC's step)."""
    if carry is not None:
        x = x + carry.float() * carry_gate
    return F.linear(_rms(x, eps) * final_mod[0] + final_mod[1], out_w, out_b)


class VisionBlock(nn.Module):
    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        attn = layer.self_attn
        self.num_heads, self.eps = attn.num_heads, layer.eps
        q, k, v = (_fold_layernorm(layer.layer_norm1, p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.qkv = Linear(torch.cat([q[0], k[0], v[0]]), torch.cat([q[1], k[1], v[1]]), dtype)
        self.out = Linear(attn.out_proj.weight, attn.out_proj.bias, dtype)
        self.fc1 = Linear(*_fold_layernorm(layer.layer_norm2, layer.mlp.fc1), dtype)
        self.fc2 = Linear(layer.mlp.fc2.weight, layer.mlp.fc2.bias, dtype)

    def args(self) -> tuple:
        return (self.qkv.params, self.out.params, self.fc1.params, self.fc2.params, self.num_heads, self.eps)


class PrefixBlock(nn.Module):
    """A Gemma 2B layer's weights, with the norms' (1 + w) folded into the following GEMMs."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, kv_only: bool) -> None:
        super().__init__()
        cfg = layer.self_attn.cfg
        self.num_heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
        scale1 = 1.0 + layer.input_layernorm.weight.float()
        attn = layer.self_attn
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).float() * scale1[None, :]
        if kv_only:  # the last layer's queries, output and MLP feed nothing
            w_qkv = w_qkv[cfg.num_heads * cfg.head_dim:]
        self.qkv = Linear(w_qkv, None, dtype)
        self.out = self.gate_up = self.down = None
        if not kv_only:
            scale2 = 1.0 + layer.post_attention_layernorm.weight.float()
            self.out = Linear(attn.o_proj.weight, None, dtype)
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).float() * scale2[None, :]
            self.gate_up = Linear(gate_up, None, dtype)
            self.down = Linear(layer.mlp.down_proj.weight, None, dtype)

    def args(self) -> tuple:
        rest = (None, None, None) if self.out is None else (self.out.params, self.gate_up.params, self.down.params)
        return (self.qkv.params, *rest, self.num_heads, self.head_dim, self.eps)


class ExpertBlock(nn.Module):
    """An action-expert layer's weights; its adaRMS modulation is precomputed per step schedule."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        cfg = layer.self_attn.cfg
        self.num_heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
        attn = layer.self_attn
        self.qkv = Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), None, dtype)
        self.out = Linear(attn.o_proj.weight, None, dtype)
        self.gate_up = Linear(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]), None, dtype)
        self.down = Linear(layer.mlp.down_proj.weight, None, dtype)

    def args(self) -> tuple:
        return (self.qkv.params, self.out.params, self.gate_up.params, self.down.params,
                self.num_heads, self.head_dim, self.eps)


# Reference parameters the fast path still reads after packing: the time MLP and the expert's adaRMS
# layers (to build step schedules). Everything else can be released once packed.
KEEP_REFERENCE = ("time_mlp", "layernorm.dense", "expert.norm.")


def release_parameters(module: nn.Module, prefix: str = "") -> None:
    """Replace `module`'s parameters (except KEEP_REFERENCE ones) by empty ones, freeing their memory.

    New Parameter objects rather than `param.data = ...`: a packed Linear may hold the very same tensor.
    """
    for module_name, sub in module.named_modules(prefix=prefix):
        for name, param in list(sub._parameters.items()):
            if param is not None and not any(k in f"{module_name}.{name}" for k in KEEP_REFERENCE):
                sub._parameters[name] = nn.Parameter(param.new_empty(0), requires_grad=False)


class FastModel(nn.Module):
    """Pi0.5 weights prepared for inference; every buffer it writes is passed in by the caller.

    Batches: B rows of the same number of views, each with its own prompt length (`n_valid` [B]: its valid
    prefix tokens, which come first in its row) and noise. The fused expert kernels (kernels/expert.py) are
    batch 1; the layer functions here take any B.

    With `release_reference`, each reference layer's weights are freed as soon as that layer is packed, so
    building never holds two full copies of the model (the reference cannot run afterwards).
    """

    def __init__(self, ref: Pi05Model, dtype: torch.dtype = torch.bfloat16, attention: str = "gemm",
                 release_reference: bool = False) -> None:
        super().__init__()
        start = time.perf_counter()
        cfg: Pi05Config = ref.cfg
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.cfg, self.dtype = cfg, dtype
        # each stack's attention (ATTENTION's keys); the pipeline may choose the prefill's per batch size
        self.prefix_attention = self.expert_attention = attention
        # The options below are off on a bare FastModel; Pi05Pipeline sets them (its defaults: both fused MLPs
        # with FP8 on Hopper, SigLIP's with fp8_vision; the carry everywhere; docs/benchmarks.md §70).
        # The prefix MLP's FP8 gate_up + GeGLU as one kernel (kernels/geglu.py); layers whose MLP is not FP8
        # ignore it.
        self.prefix_fused_mlp = False
        # SigLIP's FP8 fc1 + GELU the same way (with fp8_vision)
        self.vision_fused_mlp = False
        # Each layer's last residual add done by the next layer, fused into its first norm (`vision_layer`'s
        # residual carry): it saves a float32 pass per layer (a batch of 8 0.3 ms faster on an H100), and costs
        # more compiled variants (each stack's first layer takes no carry: on the tiny model
        # 14 graphs against 9 over vision, prefill, denoise and a guided step). Set it before a pipeline's first
        # run: its CUDA graphs are captured once and not keyed by it.
        self.carry_residual = False
        emb = ref.vision.embeddings
        # the stride-14 patch convolution as one GEMM over flattened patches: [width, (channel, kh, kw)]
        self.register_buffer("patch_w", emb.patch_embedding.weight.flatten(1).to(dtype))
        self.register_buffer("patch_b", emb.patch_embedding.bias.to(dtype))
        self.patch_size = cfg.vision.patch_size
        self.register_buffer("pos_embed", emb.position_embedding.weight.float())
        def packed(block: nn.Module, layer: nn.Module, name: str) -> nn.Module:
            if release_reference:
                release_parameters(layer, name)
            return block

        self.vision_blocks = nn.ModuleList(
            packed(VisionBlock(layer, dtype), layer, f"vision.layers.{i}") for i, layer in enumerate(ref.vision.layers)
        )
        self.vision_eps = cfg.vision.layer_norm_eps
        self.projector = Linear(*_fold_layernorm(ref.vision.post_layernorm, ref.projector), dtype)
        depth = len(ref.vlm.layers)
        self.prefix_blocks = nn.ModuleList(
            packed(PrefixBlock(layer, dtype, kv_only=i == depth - 1), layer, f"vlm.layers.{i}")
            for i, layer in enumerate(ref.vlm.layers)
        )
        self.expert_blocks = nn.ModuleList(
            packed(ExpertBlock(layer, dtype), layer, f"expert.layers.{i}") for i, layer in enumerate(ref.expert.layers)
        )
        self.expert_eps = cfg.expert.rms_norm_eps
        # The action head stays float32 (small and precision-sensitive, as openpi keeps it).
        self.register_buffer("action_in_w", ref.action_in_proj.weight.float())
        self.register_buffer("action_in_b", ref.action_in_proj.bias.float())
        self.register_buffer("action_out_w", ref.action_out_proj.weight.float())
        self.register_buffer("action_out_b", ref.action_out_proj.bias.float())
        self._ref = ref  # for the time MLP and the adaRMS dense layers, used only when a schedule is built
        self.token_table = ref.embed_tokens  # not a buffer: it stays where the loader put it (host memory)
        if release_reference:
            release_parameters(ref)
            ref.released = True
        self.text_scale = cfg.text_embed_scale
        # One RoPE table for every position the prefix + suffix can take: the text padded up to its tile (at most 64
        # tokens; the pipeline's default is 16) may add positions the tokens never reach.
        max_pos = len(cfg.image_keys) * cfg.vision.num_patches + cfg.max_token_len + 64 + cfg.action_horizon
        inv_freq = 1.0 / (cfg.vlm.rope_theta ** (torch.arange(0, cfg.vlm.head_dim, 2).float() / cfg.vlm.head_dim))
        angles = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1).to(self.pos_embed.device)
        self.register_buffer("rope_cos", angles.cos())
        self.register_buffer("rope_sin", angles.sin())
        if self.pos_embed.device.type == "cuda":
            torch.cuda.synchronize(self.pos_embed.device)
        self.build_seconds = time.perf_counter() - start  # packing time, for the pipeline's setup report

    def linears(self) -> dict[str, Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    def quantize_fp8(self, input_amax: dict[str, float], patterns: tuple[str, ...],
                     headroom: float = FP8_HEADROOM) -> list[str]:
        """FP8 for the linears whose names match `patterns` (e.g. prefix_blocks.*.gate_up), with static input
        scales from `input_amax` (see engine/fast/calibration.py); returns their names."""
        linears = self.linears()
        chosen = [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        for name in chosen:
            linears[name].quantize_fp8(input_amax[name], headroom)
        return chosen

    def compile(self) -> None:  # type: ignore[override]
        """Swap in torch.compile'd layer functions: norms, RoPE, activations and FP8 quantization fuse into
        a few Triton kernels per layer. One compiled function serves every layer of its stack."""
        # Each (batch bucket, views, last layer or not) is a compilation of its own (the prefix layer's batch and
        # length dimensions turn dynamic after their first change): more than dynamo's default limit of 8 per
        # function, past which it would silently run the layer eagerly. (`cache_size_limit` before torch 2.7.)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        self._vision_layer = torch.compile(vision_layer, dynamic=False)
        self._embed_patches = torch.compile(embed_patches, dynamic=False)
        self._vision_head = torch.compile(vision_head, dynamic=False)
        # The token count is marked dynamic in prefill(): one compilation serves every prompt length, and a
        # prompt entering a new 16-token tile costs only a graph capture.
        self._prefix_layer = torch.compile(prefix_layer)
        self._compiled = True
        self._expert_layer = torch.compile(expert_layer, dynamic=False)
        self._action_head = torch.compile(action_head, dynamic=False)
        self._action_delta = torch.compile(action_delta, dynamic=False)

    _compiled = False
    _vision_layer = staticmethod(vision_layer)
    _embed_patches = staticmethod(embed_patches)
    _vision_head = staticmethod(vision_head)
    _prefix_layer = staticmethod(prefix_layer)
    _expert_layer = staticmethod(expert_layer)
    _action_head = staticmethod(action_head)
    _action_delta = staticmethod(action_delta)

    @contextmanager
    def linears_through(self, linear_fn: LinearFn) -> Iterator[None]:
        """Within the block every linear layer runs eagerly through `linear_fn(x, params)` instead of `linear`:
        FP8 calibration records inputs this way (engine/fast/calibration.py), tools/fp8_emulation.py emulates FP8.
        Compiled layer functions are set aside meanwhile, so `linear_fn` may do anything on the host."""
        routed = {"_vision_layer": functools.partial(vision_layer, linear_fn=linear_fn),
                  "_prefix_layer": functools.partial(prefix_layer, linear_fn=linear_fn),
                  "_expert_layer": functools.partial(expert_layer, linear_fn=linear_fn),
                  "_vision_head": functools.partial(vision_head, linear_fn=linear_fn)}
        saved = {name: self.__dict__.get(name) for name in routed}  # compiled functions, once compile() ran
        for name, fn in routed.items():
            setattr(self, name, fn)
        try:
            yield
        finally:
            for name, fn in saved.items():
                if fn is None:
                    delattr(self, name)  # back to the class's plain function
                else:
                    setattr(self, name, fn)

    # --- schedule-dependent constants

    @torch.no_grad()
    def step_schedule(self, num_steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the `num_steps` schedule: per step and layer (1+scale, shift, gate) x 2 norms [S, L, 6, W];
        the final norm's (1+scale, shift) [S, 2, W]; and the action head with dt folded in (weight, bias)."""
        ref = self._ref
        steps = euler_schedule(num_steps, ref.cfg.time_grid)
        t = torch.tensor([s[0] for s in steps], dtype=torch.float32, device=self.pos_embed.device)
        cond = ref.time_condition(t).to(ref.compute_dtype)  # [S, W], rounded as the reference rounds it
        per_layer = []
        for layer in ref.expert.layers:
            mods = []
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                scale, shift, gate = (m.squeeze(1).float() for m in norm.modulation(cond))
                mods += [1.0 + scale, shift, gate]
            per_layer.append(torch.stack(mods, dim=1))  # [S, 6, W]
        scale, shift, _ = (m.squeeze(1).float() for m in ref.expert.norm.modulation(cond))
        dt = steps[0][1]
        return (torch.stack(per_layer, dim=1).contiguous(), torch.stack([1.0 + scale, shift], 1).contiguous(),
                self.action_out_w * dt, self.action_out_b * dt)

    # --- stages

    def vision(self, images_u8: Tensor, out: Tensor) -> None:
        """uint8 [B * V, 224, 224, 3] -> projected image tokens written into `out` [V * 256, vlm width] (B = 1) or
        [B, V * 256, vlm width] (each row's views in order)."""
        x = self._embed_patches(images_u8, self.patch_w, self.patch_b, self.pos_embed, self.patch_size)
        # the option only when on: tools replace _vision_layer with variants that do not take it
        fused = {"fused_mlp": True} if self.vision_fused_mlp else {}
        carry, defer = None, self.carry_residual
        for block in self.vision_blocks:
            result = self._vision_layer(x, *block.args(), carry=carry, defer=defer, **fused)
            x, carry = result if defer else (result, None)
        out.copy_(self._vision_head(x, self.projector.params, self.vision_eps, carry=carry).reshape(out.shape))

    def prefill(self, prefix: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor],
                attention: str | None = None) -> None:
        """Gemma 2B over prefix [B, L, W] (each row's valid tokens first, `n_valid` [B] or a scalar of them); K/V
        into the first L rows of keys/values [B, 1, C, D] (C >= L: the capacity, constant across prompt lengths).
        `attention` overrides `prefix_attention` for this call."""
        attention = attention or self.prefix_attention
        length, capacity = prefix.shape[1], keys[0].shape[2]
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        key_mask = (torch.arange(capacity, device=prefix.device) < n_valid.view(-1, 1)).view(-1, 1, 1, capacity)
        if self._compiled:
            for t in (prefix, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 1 if t is prefix else 0)
        x, carry, defer = prefix, None, self.carry_residual
        for block, k, v in zip(self.prefix_blocks, keys, values, strict=True):
            result = self._prefix_layer(x, cos, sin, key_mask, k, v, *block.args(), attention,
                                        fused_mlp=self.prefix_fused_mlp, carry=carry, defer=defer)
            x, carry = result if defer else (result, None)

    def denoise(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor],
                schedule: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        """All Euler steps in place on x_t [B, H, action_dim].

        keys/values [B, 1, C + H, D]: the prefix's rows first (`n_valid` valid ones), the suffix's last H rows.
        """
        mods, final_mods, out_w, out_b = schedule
        where = self.suffix_inputs(x_t, n_valid, keys)
        for step in range(mods.shape[0]):
            self.denoise_step(x_t, n_valid, keys, values, mods[step], final_mods[step], out_w, out_b, where=where)

    def suffix_inputs(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The suffix's RoPE tables [B, H, D] and the key mask [B, 1, 1, total] (each row's valid prefix rows and
        the suffix's last H rows); `n_valid` [B] or a scalar."""
        horizon = x_t.shape[1]
        n_valid = n_valid.view(-1, 1)
        positions = n_valid + torch.arange(horizon, device=x_t.device)
        total = keys[0].shape[2]
        idx = torch.arange(total, device=x_t.device)
        key_mask = ((idx < n_valid) | (idx >= total - horizon)).view(-1, 1, 1, total)
        return self.rope_cos[positions], self.rope_sin[positions], key_mask

    def denoise_step(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor], mods: Tensor,
                     final_mod: Tensor, out_w: Tensor, out_b: Tensor,
                     where: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """One Euler step in place on x_t: mods [L, 6, W] and final_mod [2, W] are this step's rows of the
        schedule, out_w / out_b its dt-folded action head."""
        cos, sin, key_mask = where or self.suffix_inputs(x_t, n_valid, keys)
        x = F.linear(x_t, self.action_in_w, self.action_in_b)
        x, carry = self._expert_layers(self._expert_layer, x, mods, cos, sin, key_mask, keys, values,
                                       self.expert_attention)
        self._action_head(x_t, x, final_mod, out_w, out_b, self.expert_eps, *carry)

    def _expert_layers(self, layer_fn: Callable, x: Tensor, mods: Tensor, cos: Tensor, sin: Tensor,
                       key_mask: Tensor, keys: list[Tensor], values: list[Tensor],
                       attention: str) -> tuple[Tensor, tuple]:
        """The expert's layers over x; returns x and what the action head still adds: (the last layer's MLP output,
        its gate) under the residual carry, () otherwise."""
        carry = gate = None
        defer = self.carry_residual
        for layer, block in enumerate(self.expert_blocks):
            result = layer_fn(x, mods[layer], cos, sin, key_mask, keys[layer], values[layer], *block.args(),
                              attention, carry=carry, carry_gate=gate, defer=defer)
            x, carry = result if defer else (result, None)
            gate = mods[layer][5]
        return x, ((carry, gate) if carry is not None else ())

    def guided_step(self, x_t: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor], mods: Tensor,
                    final_mod: Tensor, out_w: Tensor, out_b: Tensor, t: Tensor | float, dt: Tensor | float,
                    previous: Tensor, weights: Tensor, beta: Tensor | float,
                    where: tuple[Tensor, Tensor, Tensor] | None = None, compiled: bool = True) -> None:
        """One Euler step with real-time-chunking guidance, in place on x_t (engine/rtc.py has the math).

        The step's increment dt * v comes from the same layers as `denoise_step`, differentiated with autograd
        (the VJP through the expert; FP8 linears, which have no backward, pass it through their dequantized
        weights). t, dt and beta may be device scalars (inside a CUDA graph they are data). `compiled=False` runs
        the plain layer functions (where torch.compile cannot differentiate them).
        """
        cos, sin, key_mask = where or self.suffix_inputs(x_t, n_valid, keys)
        layer_fn = self._expert_layer if compiled else expert_layer
        delta_fn = self._action_delta if compiled else action_delta
        # the VJP needs a differentiable attention
        attention = "gemm" if self.expert_attention == "flash" else self.expert_attention
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            x = F.linear(x_in, self.action_in_w, self.action_in_b)
            x, carry = self._expert_layers(layer_fn, x, mods, cos, sin, key_mask, keys, values, attention)
            delta = delta_fn(x, final_mod, out_w, out_b, self.expert_eps, *carry)
            clean = x_in - (t / dt) * delta  # x - t * v, v = delta / dt
            err = weights * (previous - clean)
            (g,) = torch.autograd.grad(clean, x_in, grad_outputs=err.detach())
        weight = guidance_weight_tensor(torch.as_tensor(t, device=x_t.device), torch.as_tensor(beta, device=x_t.device))
        # v - w g, times dt
        x_t.add_(delta.detach() - dt * weight * g)

    def guided_step_in_cache(self, x_t: Tensor, n_valid: Tensor, key_cache: list[Tensor],
                             value_cache: list[Tensor], rows: int, *args, **kwargs) -> None:
        """`guided_step` on the first `rows` rows (and x_t's batch rows) of whole K/V cache tensors (the
        pipeline's), callable under no_grad and step after step.

        The step writes the suffix's K/V into the cache with autograd recording (the VJP goes through them).
        Views made under no_grad, or kept from an earlier step (whose write made them part of a graph), refuse
        that in-place write, so each step makes fresh views in grad mode; afterwards the caches are detached,
        so the recorded graph does not keep the step's activations alive.
        """
        batch = x_t.shape[0]
        with torch.enable_grad():
            keys = [k[:batch, :, :rows] for k in key_cache]
            values = [v[:batch, :, :rows] for v in value_cache]
        self.guided_step(x_t, n_valid, keys, values, *args, **kwargs)
        for cache in (*key_cache, *value_cache):
            cache.detach_()

    def embed_text_rows(self, rows: Tensor, out: Tensor) -> None:
        """Token-table rows (gathered on the host) * sqrt(width) into the prefix slice `out`."""
        out.copy_(rows.float() * self.text_scale)


@dataclass
class EagerPrefix:
    """The prefix's K/V after `prefill_eager`, with room for the suffix's rows; any number of denoise runs reuse it."""

    n_valid: Tensor
    keys: list[Tensor]
    values: list[Tensor]


@torch.no_grad()
def sample_eager(fast: FastModel, images_u8: Tensor, text_rows: Tensor, noise: Tensor, num_steps: int,
                 tile: int = 16) -> Tensor:
    """The whole fast path without graphs or staging (tests, and a check of graph replay against eager).

    images_u8 [V, 224, 224, 3] uint8; text_rows [T, width] (token-table rows); noise [H, action_dim].
    """
    return denoise_eager(fast, prefill_eager(fast, images_u8, text_rows, tile), noise, num_steps)


@torch.no_grad()
def prefill_eager(fast: FastModel, images_u8: Tensor, text_rows: Tensor, tile: int = 16) -> EagerPrefix:
    """Vision, text rows and Gemma 2B over the prefix (the first half of `sample_eager`); n_valid a scalar."""
    prefix = prefill_eager_batch(fast, images_u8[None], [text_rows], tile)
    return EagerPrefix(prefix.n_valid[0], prefix.keys, prefix.values)


@torch.no_grad()
def prefill_eager_batch(fast: FastModel, images_u8: Tensor, text_rows: list[Tensor], tile: int = 16) -> EagerPrefix:
    """`prefill_eager` for B rows: images_u8 [B, V, 224, 224, 3], text_rows[b] [T_b, width]. Every row's text is
    padded to the longest row's tile; n_valid [B] says where each row's tokens end."""
    cfg, dev = fast.cfg, fast.pos_embed.device
    batch, views = images_u8.shape[:2]
    image_len = views * cfg.vision.num_patches
    text_len = max(prefix_capacity(cfg, views, rows.shape[0], tile)[0] for rows in text_rows)
    prefix_len = image_len + text_len
    n_valid = torch.tensor([image_len + rows.shape[0] for rows in text_rows], device=dev)
    prefix = torch.zeros(batch, prefix_len, cfg.vlm.width, device=dev)
    fast.vision(images_u8.flatten(0, 1).to(dev), prefix[:, :image_len])
    padded = torch.zeros(batch, text_len, cfg.vlm.width, dtype=text_rows[0].dtype, device=dev)
    for row, rows in enumerate(text_rows):
        padded[row, : rows.shape[0]] = rows
    fast.embed_text_rows(padded, prefix[:, image_len:])
    total = prefix_len + cfg.action_horizon
    keys = [torch.zeros(batch, 1, total, cfg.vlm.head_dim, dtype=fast.dtype, device=dev) for _ in fast.prefix_blocks]
    values = [torch.zeros_like(k) for k in keys]
    fast.prefill(prefix, n_valid, [k[:, :, :prefix_len] for k in keys], [v[:, :, :prefix_len] for v in values])
    return EagerPrefix(n_valid, keys, values)


@torch.no_grad()
def denoise_eager(fast: FastModel, prefix: EagerPrefix, noise: Tensor, num_steps: int) -> Tensor:
    """`num_steps` Euler steps from `noise` [H, action_dim] (or [B, H, action_dim] after `prefill_eager_batch`)
    against a prefilled prefix -> actions of the same shape."""
    x = noise.to(prefix.n_valid.device, torch.float32).clone()
    batched = x.dim() == 3
    x = x if batched else x[None]
    fast.denoise(x, prefix.n_valid, prefix.keys, prefix.values, fast.step_schedule(num_steps))
    return x if batched else x[0]


def prefix_capacity(cfg: Pi05Config, views: int, text_tokens: int, tile: int) -> tuple[int, int]:
    """(text tokens padded up to `tile`, prefix length) for a given observation layout."""
    padded = min(math.ceil(max(text_tokens, 1) / tile) * tile, math.ceil(cfg.max_token_len / tile) * tile)
    return padded, views * cfg.vision.num_patches + padded

"""The fast path's model: the reference weights re-packed for inference, and the math that uses them.

What changes against `engine/reference.py` (the math is the same function):
- norm scales are folded into the following linear: Gemma's `(1 + w)` and SigLIP's LayerNorm affine;
- q/k/v are one GEMM, gate/up one GEMM;
- the prefix's last layer computes only K/V (nothing reads its output);
- the expert's adaRMS (scale, shift, gate) and the time MLP depend only on t: they are computed once per step
  schedule, and the expert's `dense` weights are dropped; `dt` is folded into `action_out_proj`;
- the residual stream is float32, GEMM inputs bfloat16 or FP8 e4m3 (static per-tensor scales).

Everything here is plain PyTorch on preallocated tensors, so it runs eagerly on any device (tests compare
it with the reference on CPU) and can be captured into CUDA graphs by `engine/pipeline.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi05_ros.engine.config import Pi05Config
from pi05_ros.engine.reference import Pi05Model, euler_schedule

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_HEADROOM = 4.0


class Linear(nn.Module):
    """y = x W^T + b: bfloat16 GEMM, or FP8 e4m3 with per-tensor weight and static activation scales."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.fp8 = False
        self.amax: float | None = None  # set while calibrating: the largest |input| seen

    def quantize_fp8(self, input_amax: float, headroom: float = FP8_HEADROOM) -> None:
        """Quantize the weight once; inputs will be scaled by a static amax from calibration.

        e4m3 is a floating-point format: scaling the calibrated amax up by `headroom` costs little precision
        (only the tiniest values reach subnormals) and keeps inputs larger than any seen in calibration from
        being clipped, which costs far more.
        """
        w = self.weight.float()
        w_scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
        self.weight = (w / w_scale).to(torch.float8_e4m3fn).contiguous()
        self.register_buffer("w_scale", w_scale.reshape(()).float())
        x_scale = torch.tensor(max(input_amax, 1e-6) * headroom / FP8_MAX, device=w.device)
        self.register_buffer("x_scale", x_scale.float())
        self.register_buffer("x_inv_scale", (1.0 / x_scale).float())
        if self.bias is not None:
            self.bias = self.bias.to(torch.bfloat16)
        self.fp8 = True

    def forward(self, x: Tensor) -> Tensor:
        if self.amax is not None:  # calibration pass (eager only)
            self.amax = max(self.amax, float(x.detach().abs().max()))
        if not self.fp8:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq = (x2.float() * self.x_inv_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.x_scale, scale_b=self.w_scale,
                             bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*lead, -1)


def _rms(x: Tensor, eps: float) -> Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x.float() * cos + rotated.float() * sin


def _fold_layernorm(ln: nn.LayerNorm, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """linear(LN(x)) = linear'(normalize(x)) with W' = W * gamma, b' = b + W @ beta (in float32)."""
    w = linear.weight.float()
    bias = linear.bias.float() if linear.bias is not None else torch.zeros(w.shape[0], device=w.device)
    return w * ln.weight.float()[None, :], bias + w @ ln.bias.float()


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

    def forward(self, x: Tensor) -> Tensor:
        b, n, width = x.shape
        h = F.layer_norm(x, (width,), eps=self.eps)
        qkv = self.qkv(h).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, width)).float()
        h = F.layer_norm(x, (width,), eps=self.eps)
        return x + self.fc2(F.gelu(self.fc1(h), approximate="tanh")).float()


class PrefixBlock(nn.Module):
    """A Gemma 2B layer over the packed prefix, writing its K/V into the cache."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, kv_only: bool) -> None:
        super().__init__()
        cfg = layer.self_attn.cfg
        self.num_heads, self.head_dim, self.eps, self.kv_only = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps, kv_only
        self.q_width = cfg.num_heads * cfg.head_dim
        scale1 = 1.0 + layer.input_layernorm.weight.float()
        attn = layer.self_attn
        w_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).float() * scale1[None, :]
        if kv_only:  # the last layer's queries, output and MLP feed nothing
            w_qkv = w_qkv[self.q_width:]
        self.qkv = Linear(w_qkv, None, dtype)
        if not kv_only:
            scale2 = 1.0 + layer.post_attention_layernorm.weight.float()
            self.out = Linear(attn.o_proj.weight, None, dtype)
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).float() * scale2[None, :]
            self.gate_up = Linear(gate_up, None, dtype)
            self.down = Linear(layer.mlp.down_proj.weight, None, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, k_out: Tensor, v_out: Tensor) -> Tensor:
        b, n, width = x.shape
        d = self.head_dim
        qkv = self.qkv(_rms(x, self.eps))
        kv = qkv[..., -2 * d:]
        k_out.copy_(_rope(kv[..., :d].unsqueeze(1), cos, sin))
        v_out.copy_(kv[..., d:].unsqueeze(1))
        if self.kv_only:
            return x
        q = _rope(qkv[..., : self.q_width].view(b, n, self.num_heads, d).transpose(1, 2), cos, sin).to(k_out.dtype)
        attn = F.scaled_dot_product_attention(q, k_out.expand(b, self.num_heads, n, d),
                                              v_out.expand(b, self.num_heads, n, d), attn_mask=key_mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, -1)).float()
        gate, up = self.gate_up(_rms(x, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.gelu(gate, approximate="tanh") * up).float()


class ExpertBlock(nn.Module):
    """An action-expert layer; its adaRMS modulation comes in precomputed for the current step."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        cfg = layer.self_attn.cfg
        self.num_heads, self.head_dim, self.eps = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps
        self.q_width = cfg.num_heads * cfg.head_dim
        attn = layer.self_attn
        self.qkv = Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), None, dtype)
        self.out = Linear(attn.o_proj.weight, None, dtype)
        self.gate_up = Linear(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]), None, dtype)
        self.down = Linear(layer.mlp.down_proj.weight, None, dtype)

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor,
                k_cache: Tensor, v_cache: Tensor, prefix_len: int) -> Tensor:
        """mod [6, width]: (1+scale, shift, gate) for the attention norm, then for the MLP norm."""
        b, n, _ = x.shape
        d = self.head_dim
        qkv = self.qkv(_rms(x, self.eps) * mod[0] + mod[1])
        k_cache[:, :, prefix_len:].copy_(_rope(qkv[..., self.q_width:self.q_width + d].unsqueeze(1), cos, sin))
        v_cache[:, :, prefix_len:].copy_(qkv[..., self.q_width + d:].unsqueeze(1))
        q = _rope(qkv[..., : self.q_width].view(b, n, self.num_heads, d).transpose(1, 2), cos, sin).to(k_cache.dtype)
        total = k_cache.shape[2]
        attn = F.scaled_dot_product_attention(q, k_cache.expand(b, self.num_heads, total, d),
                                              v_cache.expand(b, self.num_heads, total, d), attn_mask=key_mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, -1)).float() * mod[2]
        gate, up = self.gate_up(_rms(x, self.eps) * mod[3] + mod[4]).chunk(2, dim=-1)
        return x + self.down(F.gelu(gate, approximate="tanh") * up).float() * mod[5]


class FastModel(nn.Module):
    """Pi0.5 weights prepared for inference. Batch 1; every buffer it writes is passed in by the caller."""

    def __init__(self, ref: Pi05Model, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        cfg: Pi05Config = ref.cfg
        self.cfg, self.dtype = cfg, dtype
        emb = ref.vision.embeddings
        self.register_buffer("patch_w", emb.patch_embedding.weight.to(dtype))
        self.register_buffer("patch_b", emb.patch_embedding.bias.to(dtype))
        self.patch_size = cfg.vision.patch_size
        self.register_buffer("pos_embed", emb.position_embedding.weight.float())
        self.vision_blocks = nn.ModuleList(VisionBlock(layer, dtype) for layer in ref.vision.layers)
        self.vision_eps = cfg.vision.layer_norm_eps
        self.projector = Linear(*_fold_layernorm(ref.vision.post_layernorm, ref.projector), dtype)
        depth = len(ref.vlm.layers)
        self.prefix_blocks = nn.ModuleList(
            PrefixBlock(layer, dtype, kv_only=i == depth - 1) for i, layer in enumerate(ref.vlm.layers)
        )
        self.expert_blocks = nn.ModuleList(ExpertBlock(layer, dtype) for layer in ref.expert.layers)
        self.expert_eps = cfg.expert.rms_norm_eps
        # The action head stays float32 (small and precision-sensitive, as openpi keeps it).
        self.register_buffer("action_in_w", ref.action_in_proj.weight.float())
        self.register_buffer("action_in_b", ref.action_in_proj.bias.float())
        self.register_buffer("action_out_w", ref.action_out_proj.weight.float())
        self.register_buffer("action_out_b", ref.action_out_proj.bias.float())
        self._ref = ref  # for the time MLP and the adaRMS dense layers, used only when a schedule is built
        self.text_scale = cfg.text_embed_scale
        # One RoPE table for every position the prefix + suffix can take.
        max_pos = len(cfg.image_keys) * cfg.vision.num_patches + cfg.max_token_len + cfg.action_horizon
        inv_freq = 1.0 / (cfg.vlm.rope_theta ** (torch.arange(0, cfg.vlm.head_dim, 2).float() / cfg.vlm.head_dim))
        angles = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1).to(self.pos_embed.device)
        self.register_buffer("rope_cos", angles.cos())
        self.register_buffer("rope_sin", angles.sin())

    def linears(self) -> dict[str, Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}

    # --- schedule-dependent constants

    @torch.no_grad()
    def step_modulation(self, num_steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """For the `num_steps` schedule: per step and layer (1+scale, shift, gate) x 2 norms [S, L, 6, W];
        the final norm's (1+scale, shift) [S, 2, W]; and dt (a float32 scalar tensor)."""
        ref = self._ref
        steps = euler_schedule(num_steps)
        t = torch.tensor([s[0] for s in steps], dtype=torch.float32, device=self.pos_embed.device)
        cond = ref.time_condition(t)  # [S, W]
        per_layer = []
        for layer in ref.expert.layers:
            mods = []
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                scale, shift, gate = (m.squeeze(1).float() for m in norm.modulation(cond.to(norm.dense.weight.dtype)))
                mods += [1.0 + scale, shift, gate]
            per_layer.append(torch.stack(mods, dim=1))  # [S, 6, W]
        scale, shift, _ = (m.squeeze(1).float() for m in ref.expert.norm.modulation(cond))
        dt = torch.tensor(steps[0][1], dtype=torch.float32, device=t.device)
        return torch.stack(per_layer, dim=1).contiguous(), torch.stack([1.0 + scale, shift], 1).contiguous(), dt

    # --- stages

    def vision(self, images_u8: Tensor, out: Tensor) -> None:
        """uint8 [V, 224, 224, 3] -> projected image tokens written into `out` [V * 256, vlm width]."""
        x = images_u8.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        x = F.conv2d(x.to(self.dtype), self.patch_w, self.patch_b, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2).float() + self.pos_embed
        for block in self.vision_blocks:
            x = block(x)
        h = F.layer_norm(x, (x.shape[-1],), eps=self.vision_eps)
        out.copy_(self.projector(h).reshape(out.shape))

    def prefill(self, prefix: Tensor, n_valid: Tensor, keys: list[Tensor], values: list[Tensor]) -> None:
        """Gemma 2B over prefix [1, L, W] (valid tokens first, `n_valid` of them), K/V into keys/values [1,1,L,D]."""
        length = prefix.shape[1]
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        key_mask = (torch.arange(length, device=prefix.device) < n_valid).view(1, 1, 1, length)
        x = prefix
        for block, k, v in zip(self.prefix_blocks, keys, values, strict=True):
            x = block(x, cos, sin, key_mask, k, v)

    def denoise(self, x_t: Tensor, n_valid: Tensor, prefix_len: int, keys: list[Tensor], values: list[Tensor],
                mods: Tensor, final_mods: Tensor, dt: Tensor) -> None:
        """All Euler steps in place on x_t [1, H, action_dim]; keys/values [1, 1, prefix_len + H, D]."""
        horizon = x_t.shape[1]
        positions = n_valid + torch.arange(horizon, device=x_t.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        total = prefix_len + horizon
        idx = torch.arange(total, device=x_t.device)
        key_mask = ((idx < n_valid) | (idx >= prefix_len)).view(1, 1, 1, total)
        out_w, out_b = self.action_out_w * dt, self.action_out_b * dt  # Euler's dt folded into the head
        for step in range(mods.shape[0]):
            x = F.linear(x_t, self.action_in_w, self.action_in_b)
            for layer, block in enumerate(self.expert_blocks):
                x = block(x, mods[step, layer], cos, sin, key_mask, keys[layer], values[layer], prefix_len)
            h = _rms(x, self.expert_eps) * final_mods[step, 0] + final_mods[step, 1]
            x_t.add_(F.linear(h, out_w, out_b))

    def embed_text_rows(self, rows: Tensor, out: Tensor) -> None:
        """Token-table rows (gathered on the host) * sqrt(width) into the prefix slice `out`."""
        out.copy_(rows.float() * self.text_scale)


@torch.no_grad()
def sample_eager(fast: FastModel, images_u8: Tensor, text_rows: Tensor, noise: Tensor, num_steps: int,
                 tile: int = 16) -> Tensor:
    """The whole fast path without graphs or staging (tests, and a check of graph replay against eager).

    images_u8 [V, 224, 224, 3] uint8; text_rows [T, width] (token-table rows); noise [H, action_dim].
    """
    cfg, dev = fast.cfg, fast.pos_embed.device
    views = images_u8.shape[0]
    text_len, prefix_len = prefix_capacity(cfg, views, text_rows.shape[0], tile)
    n_valid = torch.tensor(views * cfg.vision.num_patches + text_rows.shape[0], device=dev)
    prefix = torch.zeros(1, prefix_len, cfg.vlm.width, device=dev)
    fast.vision(images_u8.to(dev), prefix[0, : views * cfg.vision.num_patches])
    rows = torch.zeros(text_len, cfg.vlm.width, dtype=text_rows.dtype, device=dev)
    rows[: text_rows.shape[0]] = text_rows
    fast.embed_text_rows(rows, prefix[0, views * cfg.vision.num_patches:])
    total = prefix_len + cfg.action_horizon
    keys = [torch.zeros(1, 1, total, cfg.vlm.head_dim, dtype=fast.dtype, device=dev) for _ in fast.prefix_blocks]
    values = [torch.zeros_like(k) for k in keys]
    fast.prefill(prefix, n_valid, [k[:, :, :prefix_len] for k in keys], [v[:, :, :prefix_len] for v in values])
    x = noise.to(dev, torch.float32).clone()[None]
    fast.denoise(x, n_valid, prefix_len, keys, values, *fast.step_modulation(num_steps))
    return x[0]


def prefix_capacity(cfg: Pi05Config, views: int, text_tokens: int, tile: int) -> tuple[int, int]:
    """(text tokens padded up to `tile`, prefix length) for a given observation layout."""
    padded = min(math.ceil(max(text_tokens, 1) / tile) * tile, math.ceil(cfg.max_token_len / tile) * tile)
    return padded, views * cfg.vision.num_patches + padded

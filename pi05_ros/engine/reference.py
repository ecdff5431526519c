"""Pi0.5 in plain PyTorch: the readable oracle every faster path must agree with.

What it computes, in order (see ../shared/SPEC_PI05.md for the facts behind each line):

1. SigLIP turns each valid 224x224 view into 256 tokens; a linear projector maps them to the VLM width.
2. The prompt's token ids are looked up in the embedding table and scaled by sqrt(width).
3. The prefix [image tokens of valid views][valid text tokens] runs once through Gemma 2B, bidirectionally;
   each layer's K/V is kept (the prefix cache). Masked views and padding are dropped, not masked: the
   result for valid tokens is the same and no work is spent on them.
4. Flow matching: starting from noise at t=1, N Euler steps of `x += dt * v(x, t)`, where `v` is the action
   expert (Gemma 300M with adaRMSNorm conditioned on t) attending to the prefix cache and to its own tokens.

Module attribute names follow openpi's checkpoint names so the loader's name map stays short and explicit.
Parameters openpi keeps in float32 (embeddings of patches/positions, every norm, the action head) stay
float32 when the rest of the model is cast to bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi05_ros.engine.config import GemmaConfig, Pi05Config, VisionConfig
from pi05_ros.engine.rtc import guided_velocity

# Substrings of parameter names that openpi keeps in float32 under bfloat16 mixed precision.
FLOAT32_PARAM_KEYS: tuple[str, ...] = (
    "patch_embedding", "position_embedding", "layer_norm", "layernorm", "norm.",
    "action_in_proj", "action_out_proj", "time_mlp_",
)


def keeps_float32(param_name: str) -> bool:
    return any(key in param_name for key in FLOAT32_PARAM_KEYS)


def _linear(x: Tensor, layer: nn.Linear) -> Tensor:
    """A linear layer that accepts activations of another dtype (mixed precision)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x), computed in float32 whatever the input dtype."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------- SigLIP


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (_linear(x, p).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return _linear(out.transpose(1, 2).reshape(b, n, -1), self.out_proj)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(gelu_tanh(_linear(x, self.fc1)), self.fc2)


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.eps = cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def _norm(self, x: Tensor, ln: nn.LayerNorm) -> Tensor:
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), self.eps).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self._norm(x, self.layer_norm1)).to(x.dtype)
        return x + self.mlp(self._norm(x, self.layer_norm2)).to(x.dtype)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, images: Tensor) -> Tensor:
        w = self.patch_embedding.weight
        patches = F.conv2d(images.to(w.dtype), w, self.patch_embedding.bias, stride=self.patch_embedding.stride)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipVision(nn.Module):
    """SigLIP So400m/14 without its pooling head: [M, 3, 224, 224] in [-1, 1] -> [M, 256, width]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.depth))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, images: Tensor, compute_dtype: torch.dtype) -> Tensor:
        x = self.embeddings(images).to(compute_dtype)
        for layer in self.layers:
            x = layer(x)
        ln = self.post_layernorm
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------- Gemma


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: `normalize(x) * (1 + weight)`, in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """The action expert's adaptive RMSNorm: scale, shift and a residual gate come from the time condition."""

    def __init__(self, width: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * width)

    def modulation(self, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, gate), each [B, 1, width]: depends only on t, so it can be computed ahead."""
        scale, shift, gate = _linear(cond, self.dense).unsqueeze(1).chunk(3, dim=-1)
        return scale, shift, gate

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        assert cond is not None, "the action expert's norms need the time condition"
        scale, shift, gate = self.modulation(cond)
        out = rms_normalize(x, self.eps) * (1.0 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary tables for integer positions [B, N] -> cos, sin [B, 1, N, head_dim] (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the HF Gemma layout: first and second halves of each head are paired)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Eager attention, softmax in float32. q [B,H,Nq,D]; k, v [B,1,Nk,D]; key_mask [B,Nk] (True = attend)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections with RoPE: q [B,H,N,D], k and v [B,KV,N,D]."""
        b, n, _ = x.shape
        d = self.cfg.head_dim
        q = _linear(x, self.q_proj).view(b, n, -1, d).transpose(1, 2)
        k = _linear(x, self.k_proj).view(b, n, -1, d).transpose(1, 2)
        v = _linear(x, self.v_proj).view(b, n, -1, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: Tensor) -> Tensor:
        b, _, n, _ = attn.shape
        return _linear(attn.transpose(1, 2).reshape(b, n, -1), self.o_proj)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(gelu_tanh(_linear(x, self.gate_proj)) * _linear(x, self.up_proj), self.down_proj)


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        if cond_dim is None:
            self.input_layernorm: nn.Module = RMSNorm(cfg.width, cfg.rms_norm_eps)
            self.post_attention_layernorm: nn.Module = RMSNorm(cfg.width, cfg.rms_norm_eps)
        else:
            self.input_layernorm = AdaRMSNorm(cfg.width, cond_dim, cfg.rms_norm_eps)
            self.post_attention_layernorm = AdaRMSNorm(cfg.width, cond_dim, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None, cond: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One block. With `past_kv` (the prefix cache) the tokens also attend to those keys.

        Returns the new hidden states and this block's own (k, v).
        """
        h, gate = self.input_layernorm(x, cond)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        keys, values = k, v
        if past_kv is not None:
            keys, values = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        y = self.self_attn.out(attention(q, keys, values, key_mask))
        x = x + (y if gate is None else y * gate).to(x.dtype)
        h, gate = self.post_attention_layernorm(x, cond)
        y = self.mlp(h)
        x = x + (y if gate is None else y * gate).to(x.dtype)
        return x, (k, v)


class GemmaStack(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm: nn.Module = (
            RMSNorm(cfg.width, cfg.rms_norm_eps) if cond_dim is None
            else AdaRMSNorm(cfg.width, cond_dim, cfg.rms_norm_eps)
        )


# ------------------------------------------------------------------------------------------ the model


@dataclass
class PrefixCache:
    """Per-layer K/V of the prefix ([B, 1, L, D] each), which prefix slots hold tokens, and how many per row."""

    keys: list[Tensor]
    values: list[Tensor]
    valid: Tensor  # [B, L] bool
    lengths: Tensor  # [B] long


@dataclass
class ModelInputs:
    """One batch as the model sees it (after preprocessing and tokenization)."""

    images: Tensor  # [B, V, 3, H, W] float in [-1, 1]
    image_masks: Tensor  # [B, V] bool
    tokens: Tensor  # [B, T] long
    token_mask: Tensor  # [B, T] bool
    noise: Tensor  # [B, horizon, action_dim] float32


TIME_GRIDS = ("openpi", "lerobot")


def euler_schedule(num_steps: int, grid: str = "openpi") -> list[tuple[float, float]]:
    """The (t, dt) pairs of each family's sampler, exactly as its float32 flow time is made.

    "openpi" accumulates t += dt in float32 while t >= -dt/2 (1, 0.9, 0.79999995, ...); "lerobot" computes
    t = 1 + k * dt in float64 for k in 0..N-1 and rounds it to float32 (1, 0.9, 0.8, ...). Both take dt as the
    float32 of -1/N.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32)
    if grid == "lerobot":
        return [(float(torch.tensor(1.0 + k * (-1.0 / num_steps), dtype=torch.float32)), float(dt))
                for k in range(num_steps)]
    if grid != "openpi":
        raise ValueError(f"unknown time grid {grid!r}; choose one of {', '.join(TIME_GRIDS)}")
    t = torch.tensor(1.0, dtype=torch.float32)
    steps = []
    while t >= -dt / 2:
        steps.append((float(t), float(dt)))
        t = t + dt
    return steps


def time_embedding(t: Tensor, width: int, min_period: float, max_period: float) -> Tensor:
    """Sinusoidal embedding of flow time t [B] -> [B, width], computed in float64 then cast to float32."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = (2 * math.pi / period)[None, :] * t.to(torch.float64)[:, None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


StageHook = Callable[[str], Any]


class Pi05Model(nn.Module):
    """SigLIP + projector, Gemma 2B prefix, Gemma 300M action expert, flow-matching head."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.vlm.width)
        self.vlm = GemmaStack(cfg.vlm)
        self.expert = GemmaStack(cfg.expert, cond_dim=cfg.expert.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, cfg.expert.width)
        self.action_out_proj = nn.Linear(cfg.expert.width, cfg.action_dim)
        self.time_mlp_in = nn.Linear(cfg.expert.width, cfg.expert.width)
        self.time_mlp_out = nn.Linear(cfg.expert.width, cfg.expert.width)
        # The VLM's token table serves look-ups only; it lives wherever the loader put it (often host memory).
        self.embed_tokens: Tensor = torch.zeros(0, cfg.vlm.width)
        self.compute_dtype = torch.float32
        self.released = False  # set when a fast path took over the weights (see FastModel's release_reference)

    # --- precision and placement

    def set_precision(self, dtype: torch.dtype) -> Pi05Model:
        """float32 everywhere, or openpi's bfloat16 mixed precision (see FLOAT32_PARAM_KEYS)."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if keeps_float32(name) else dtype)
        self.compute_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    # --- prefix

    def embed_images(self, images: Tensor) -> Tensor:
        """[M, 3, 224, 224] -> projected image tokens [M, 256, vlm width] (not rescaled)."""
        return _linear(self.vision(images, self.compute_dtype), self.projector).to(self.compute_dtype)

    def embed_text(self, token_ids: Tensor) -> Tensor:
        """Token ids (any shape) -> embedding rows * sqrt(width), on the model's device."""
        rows = self.embed_tokens[token_ids.to(self.embed_tokens.device)].to(self.device, self.compute_dtype)
        return rows * self.cfg.text_embed_scale

    def embed_prefix(self, inputs: ModelInputs, hook: StageHook | None = None) -> tuple[Tensor, Tensor]:
        """Packed prefix [B, L, width] of each row's valid views then valid text tokens, and its validity [B, L]."""
        b, n_views = inputs.image_masks.shape
        view_rows = [(row, view) for row in range(b) for view in range(n_views) if inputs.image_masks[row, view]]
        image_tokens = (
            self.embed_images(torch.stack([inputs.images[r, v] for r, v in view_rows]).to(self.device))
            if view_rows else None
        )
        if hook:
            hook("vision")
        pieces: list[list[Tensor]] = [[] for _ in range(b)]
        for i, (row, _) in enumerate(view_rows):
            pieces[row].append(image_tokens[i])  # type: ignore[index]
        for row in range(b):
            ids = inputs.tokens[row][inputs.token_mask[row]]
            pieces[row].append(self.embed_text(ids))
        rows = [torch.cat(p, dim=0) for p in pieces]
        lengths = torch.tensor([r.shape[0] for r in rows], device=self.device)
        prefix = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        valid = torch.arange(prefix.shape[1], device=self.device)[None, :] < lengths[:, None]
        if hook:
            hook("embed_prefix")
        return prefix, valid

    def prefill(self, prefix: Tensor, valid: Tensor) -> PrefixCache:
        """Run the prefix through Gemma 2B once and keep each layer's K/V."""
        positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = rope_cos_sin(positions, self.cfg.vlm.head_dim, self.cfg.vlm.rope_theta)
        keys, values = [], []
        x = prefix
        for layer in self.vlm.layers:
            x, (k, v) = layer(x, cos, sin, valid)
            keys.append(k)
            values.append(v)
        return PrefixCache(keys, values, valid, valid.sum(dim=1))

    # --- action expert

    def time_condition(self, t: Tensor) -> Tensor:
        """cond = silu(time_mlp_out(silu(time_mlp_in(emb(t))))) for t [B] -> [B, expert width]."""
        emb = time_embedding(t, self.cfg.expert.width, self.cfg.time_min_period, self.cfg.time_max_period)
        hidden = F.silu(_linear(emb, self.time_mlp_in))
        return F.silu(_linear(hidden, self.time_mlp_out))

    def velocity(self, x_t: Tensor, t: Tensor, cache: PrefixCache) -> Tensor:
        """The flow's velocity v(x_t, t) [B, horizon, action_dim], attending to the prefix cache."""
        cond = self.time_condition(t).to(self.compute_dtype)
        x = _linear(x_t, self.action_in_proj).to(self.compute_dtype)
        horizon = x.shape[1]
        positions = cache.lengths[:, None] + torch.arange(horizon, device=x.device)[None, :]
        cos, sin = rope_cos_sin(positions, self.cfg.expert.head_dim, self.cfg.expert.rope_theta)
        key_mask = torch.cat([cache.valid, torch.ones_like(positions, dtype=torch.bool)], dim=1)
        for layer, k, v in zip(self.expert.layers, cache.keys, cache.values, strict=True):
            x, _ = layer(x, cos, sin, key_mask, past_kv=(k, v), cond=cond)
        h, _ = self.expert.norm(x, cond)
        return _linear(h, self.action_out_proj).float()

    @torch.no_grad()
    def sample_actions(self, inputs: ModelInputs, num_steps: int, hook: StageHook | None = None,
                       guidance: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
        """Actions [B, horizon, action_dim] (normalized units) after `num_steps` Euler steps from the noise.

        `hook(stage)` is called as each stage ends ("vision", "embed_prefix", "prefill_kv", "denoise").
        `guidance` = (previous chunk, soft mask, beta), each step's velocity pulled toward the previous chunk
        (real-time chunking, engine/rtc.py); previous / mask [B or 1, horizon, action_dim] in model units.
        """
        if self.released:
            raise RuntimeError("this model's weights were released to a fast pipeline; load it again to run it")
        prefix, valid = self.embed_prefix(inputs, hook)
        cache = self.prefill(prefix, valid)
        if hook:
            hook("prefill_kv")
        x = inputs.noise.to(self.device, torch.float32)
        batch = x.shape[0]
        for t, dt in euler_schedule(num_steps, self.cfg.time_grid):
            times = torch.full((batch,), t, dtype=torch.float32, device=x.device)
            if guidance is not None and guidance[2] > 0:
                previous, weights, beta = guidance
                v = guided_velocity(lambda z, times=times: self.velocity(z, times, cache), x, t, previous.to(x.device),
                                    weights.to(x.device), beta)
            else:
                v = self.velocity(x, times, cache)
            x = x + torch.tensor(dt, dtype=torch.float32, device=x.device) * v
        if hook:
            hook("denoise")
        return x


def build_on_meta(cfg: Pi05Config) -> Pi05Model:
    """The model's module tree without memory (weights come later from a checkpoint or an initializer)."""
    with torch.device("meta"):
        return Pi05Model(cfg)


def parameter_count(model: nn.Module, exclude: Sequence[str] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not any(e in n for e in exclude))

"""Loading Pi0.5 checkpoints: format detection, the explicit name map, shape checks, progress, clear errors.

Two formats are read, both safetensors with the same tensor tree:
- openpi PyTorch: a directory with `model.safetensors`, `config.json` and `assets/<id>/norm_stats.json`;
- LeRobot (`lerobot/pi05_*`): the same names under a `model.` prefix, stored float32.

Tensors are read one at a time from the memory-mapped file and moved straight to their device and dtype,
so host memory never holds more than the tensors kept plus the one in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from pi05_ros.engine.config import Pi05Config, load_config
from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.lerobot_files import camera_features, short_camera_name
from pi05_ros.engine.progress import progress_bar
from pi05_ros.engine.reference import Pi05Model, build_on_meta, keeps_float32

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
EMBED_TABLE = "embed_tokens"

_PG = "paligemma_with_expert.paligemma."
# openpi name prefix -> our module's name prefix. Everything after the prefix is identical by construction.
# Both layouts of HF PaliGemma are accepted (transformers >= 4.52 put `model.` first).
NAME_PREFIXES: tuple[tuple[str, str], ...] = (
    (_PG + "model.vision_tower.vision_model.embeddings.", "vision.embeddings."),
    (_PG + "model.vision_tower.vision_model.encoder.layers.", "vision.layers."),
    (_PG + "model.vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
    (_PG + "model.multi_modal_projector.linear.", "projector."),
    (_PG + "model.language_model.layers.", "vlm.layers."),
    (_PG + "model.language_model.norm.", "vlm.norm."),
    (_PG + "vision_tower.vision_model.embeddings.", "vision.embeddings."),
    (_PG + "vision_tower.vision_model.encoder.layers.", "vision.layers."),
    (_PG + "vision_tower.vision_model.post_layernorm.", "vision.post_layernorm."),
    (_PG + "multi_modal_projector.linear.", "projector."),
    (_PG + "language_model.model.layers.", "vlm.layers."),
    (_PG + "language_model.model.norm.", "vlm.norm."),
    ("paligemma_with_expert.gemma_expert.model.layers.", "expert.layers."),
    ("paligemma_with_expert.gemma_expert.model.norm.", "expert.norm."),
    ("action_in_proj.", "action_in_proj."),
    ("action_out_proj.", "action_out_proj."),
    ("time_mlp_in.", "time_mlp_in."),
    ("time_mlp_out.", "time_mlp_out."),
)
# The token table, in order of preference. openpi's save drops the tied `embed_tokens` and keeps `lm_head`;
# LeRobot 0.5+ saves both as DIFFERENT tensors and looks tokens up in (and fine-tunes only) `embed_tokens`, so
# whenever `embed_tokens` is present it is the table, and `lm_head` is an unused tensor.
EMBED_NAMES: tuple[str, ...] = (
    _PG + "model.language_model.embed_tokens.weight",
    _PG + "language_model.model.embed_tokens.weight",
    _PG + "lm_head.weight",
    _PG + "language_model.lm_head.weight",
)
# Tensors inference never needs: never read.
SKIPPED_NAMES: tuple[str, ...] = ("paligemma_with_expert.gemma_expert.lm_head.weight",)
# Names that only a Pi0 (not Pi0.5) checkpoint has.
PI0_MARKERS: tuple[str, ...] = ("state_proj.weight", "action_time_mlp_in.weight")


@dataclass
class CheckpointInfo:
    """What was found in a checkpoint, before or after loading."""

    path: Path
    weights_file: Path
    format: str  # "openpi" or "lerobot"
    config: Pi05Config
    prefix: str
    tensors: dict[str, tuple[tuple[int, ...], str]]  # stored name -> (shape, dtype)
    embed_name: str | None = None
    unused_tables: list[str] = field(default_factory=list)  # vocabulary tables present but not the embedding
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    dtype_mismatches: list[str] = field(default_factory=list)  # weights stored as integers or bools

    @property
    def problems(self) -> list[str]:
        out = [f"missing tensor: {name}" for name in self.missing]
        out += [f"shape mismatch: {m}" for m in self.shape_mismatches]
        out += [f"dtype: {m}" for m in self.dtype_mismatches]
        if self.embed_name is None:
            out.append("missing tensor: the token embedding table (embed_tokens or paligemma.lm_head)")
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Stored parameters per part (vision, projector, vlm, expert, action head, embed_tokens, unused)."""
        counts: dict[str, int] = {}
        for stored, (shape, _) in self.tensors.items():
            name = stored[len(self.prefix):]
            if name == self.embed_name:
                part = "embed_tokens"
            elif name in EMBED_NAMES or name in SKIPPED_NAMES:
                part = "unused (lm_head)"
            else:
                internal = map_name(name)
                part = internal.split(".")[0] if internal else "unexpected"
            counts[part] = counts.get(part, 0) + math.prod(shape)
        return counts


def map_name(stored: str) -> str | None:
    """Our module name for an openpi tensor name (without any LeRobot `model.` prefix); None if not a parameter."""
    for src, dst in NAME_PREFIXES:
        if stored.startswith(src):
            return dst + stored[len(src):]
    return None


def resolve_weights_file(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint directory, weights file) for a directory or a .safetensors path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoint directory or its model.safetensors")
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (found {', '.join(found)})" if found else ""
            raise CheckpointError(
                f"{path} has no {WEIGHTS_FILE}{hint}; pass an openpi PyTorch or LeRobot pi05 checkpoint directory "
                "(JAX/Orbax checkpoints must first be converted with openpi's convert_jax_model_to_pytorch.py)"
            )
        return path, weights
    return path.parent, path


def _open(weights: Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(str(weights), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({exc}); the file may be truncated or of another "
            "format: copy or download it again"
        ) from exc


def inspect_checkpoint(path: str | Path, config_preset: str | None = None) -> CheckpointInfo:
    """Read names, shapes and config without loading tensors; fill in missing/unexpected/mismatched names."""
    ckpt_dir, weights = resolve_weights_file(path)
    config = load_config(ckpt_dir, config_preset)
    with _open(weights) as f:
        names = list(f.keys())
        tensors = {}
        for name in names:
            sl = f.get_slice(name)
            tensors[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    if any(n.startswith("model.paligemma_with_expert.") for n in names):
        fmt, prefix = "lerobot", "model."
    elif any(n.startswith("paligemma_with_expert.") for n in names):
        fmt, prefix = "openpi", ""
    else:
        sample = ", ".join(names[:3]) or "no tensors at all"
        raise CheckpointError(
            f"{weights} holds no Pi0.5 tensors (first names: {sample}); "
            "pass an openpi PyTorch or LeRobot pi05 checkpoint"
        )
    if any(n[len(prefix):] in PI0_MARKERS for n in names):
        raise CheckpointError(
            f"{weights} is a Pi0 checkpoint (it has state_proj/action_time_mlp); pi05_ros runs Pi0.5 only"
        )
    if fmt == "lerobot":
        # LeRobot's own flow-time grid, and its camera names as the model's slots (in LeRobot's order).
        cameras = tuple(short_camera_name(name) for name in camera_features(ckpt_dir))
        config = config.replace(time_grid="lerobot", image_keys=cameras or config.image_keys)
    info = CheckpointInfo(ckpt_dir, weights, fmt, config, prefix, tensors)
    _check_names(info)
    return info


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # safetensors' names of the dtypes weights may be stored in
_FLOAT_DTYPE_NAMES = {*FLOAT_DTYPES, "float32", "bfloat16", "float16", "float64"}  # and torch's (state dict lists)


def _expected_shapes(config: Pi05Config) -> dict[str, tuple[int, ...]]:
    model = build_on_meta(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_names(info: CheckpointInfo) -> None:
    expected = _expected_shapes(info.config)
    tables = [name for name in EMBED_NAMES if info.prefix + name in info.tensors]
    if tables:
        info.embed_name, info.unused_tables = tables[0], tables[1:]
        shape = info.tensors[info.prefix + info.embed_name][0]
        want = (info.config.vocab_size, info.config.vlm.width)
        if shape != want:
            info.shape_mismatches.append(f"{info.prefix + info.embed_name}: file {list(shape)}, model {list(want)}")
    seen: set[str] = set()
    for stored, (shape, dtype) in info.tensors.items():
        if stored.startswith(info.prefix) and dtype not in _FLOAT_DTYPE_NAMES:  # a cast would load them silently
            info.dtype_mismatches.append(f"{stored} is {dtype}, expected a float type ({', '.join(FLOAT_DTYPES)})")
        if not stored.startswith(info.prefix):
            info.unexpected.append(stored)
            continue
        name = stored[len(info.prefix):]
        if name in EMBED_NAMES:
            continue
        if name in SKIPPED_NAMES:
            continue
        internal = map_name(name)
        if internal is None or internal not in expected:
            info.unexpected.append(stored)
            continue
        seen.add(internal)
        if shape != expected[internal]:
            info.shape_mismatches.append(f"{stored}: file {list(shape)}, model {list(expected[internal])}")
    prefix_of = {dst: src for src, dst in reversed(NAME_PREFIXES)}  # internal -> first openpi spelling
    for internal in sorted(set(expected) - seen):
        src = next((s + internal[len(d):] for d, s in prefix_of.items() if internal.startswith(d)), internal)
        info.missing.append(info.prefix + src)


def _nbytes(shape: Iterable[int], dtype: str) -> int:
    size = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "F8_E4M3": 1, "U8": 1}.get(dtype, 4)
    return math.prod(shape) * size


def load_model(
    path: str | Path,
    *,
    config_preset: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    embed_device: str | torch.device = "cpu",
) -> tuple[Pi05Model, CheckpointInfo]:
    """Build the reference model from a checkpoint. Raises CheckpointError naming every problem."""
    info = inspect_checkpoint(path, config_preset)
    problems = info.problems
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(
            f"{info.weights_file} ({info.format} format) does not fit the {info.config.name} config:\n  {shown}\n"
            "Check that this is a Pi0.5 checkpoint and that config.json / the config preset match it."
        )
    if info.unexpected:
        log.warning("ignoring %d tensors the model does not use: %s",
                    len(info.unexpected), ", ".join(info.unexpected[:5]))
    device = torch.device(device)
    model = build_on_meta(info.config)
    # Every stored name that maps onto a module parameter (the token tables and skipped tensors do not).
    mapped = {n: map_name(n[len(info.prefix):]) for n in info.tensors if n not in info.unexpected}
    to_load = {n: internal for n, internal in mapped.items() if internal is not None}
    embed_stored = info.prefix + str(info.embed_name)
    total = sum(_nbytes(*info.tensors[n]) for n in to_load) + _nbytes(*info.tensors[embed_stored])
    label = f"loading {info.weights_file.name}"
    start = time.monotonic()
    state: dict[str, torch.Tensor] = {}
    with _open(info.weights_file) as f, progress_bar(total, label, log=log, unit="B", unit_scale=True,
                                                     unit_divisor=1024) as progress:
        for stored, internal in to_load.items():
            target = torch.float32 if keeps_float32(internal) else dtype
            state[internal] = f.get_tensor(stored).to(device=device, dtype=target)
            progress.update(_nbytes(*info.tensors[stored]))
        embed = f.get_tensor(embed_stored).to(device=embed_device, dtype=dtype)
        progress.update(_nbytes(*info.tensors[embed_stored]))
    log.info("%s: done in %.1f s", label, time.monotonic() - start)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.embed_tokens = embed
    model.compute_dtype = dtype
    model.eval()
    return model, info

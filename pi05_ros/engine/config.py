"""Model configuration: one dataclass per part, the presets, and reading a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pi05_ros.engine.action_space import ABSOLUTE, DELTA, VELOCITY, ActionSpace
from pi05_ros.engine.errors import CheckpointError

IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (pre-LN blocks, post-LN at the end, no pooling head)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma transformer: the 2B VLM or the 300M action expert."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0


GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)


@dataclass(frozen=True)
class Pi05Config:
    """Everything that fixes the shapes and the numerics of a Pi0.5 model."""

    name: str = "pi05"
    vision: VisionConfig = field(default_factory=VisionConfig)
    vlm: GemmaConfig = GEMMA_2B
    expert: GemmaConfig = GEMMA_300M
    vocab_size: int = 257_152
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 200
    # How the prompt is written (engine/conventions.py PROMPT_FORMATS): "pi05" (the discretized robot state),
    # "pi05_padded" (the state zero-padded to max_state_dim first, LeRobot <= 0.4) or "pi0" (no state:
    # openpi's pi05_libero). The preset's value; the checkpoint's files or the caller may choose another.
    prompt_format: str = "pi05"
    max_state_dim: int = 32
    # The flow-matching time grid: "openpi" accumulates t += dt in float32 (1, 0.9, 0.79999995, ...);
    # "lerobot" computes t = 1 + k * dt per step (LeRobot 0.4.3+: 1, 0.9, 0.8, ...).
    time_grid: str = "openpi"
    # What the action columns mean, when the family is known (openpi's configs); None: not known.
    action_space: ActionSpace | None = None
    # How many state values the preset's robot sends where that differs from its action columns (LIBERO: 8, the
    # end effector's position and axis-angle and two gripper fingers, for 7 action columns); for Policy.demo's stats
    robot_state_values: int | None = None
    # the robot joint convention the checkpoint was trained in (engine/joint_conventions.py): none, aloha_to_pi
    joint_convention: str = "none"
    time_min_period: float = 4e-3
    time_max_period: float = 4.0
    image_keys: tuple[str, ...] = IMAGE_KEYS

    @property
    def text_embed_scale(self) -> float:
        return math.sqrt(self.vlm.width)

    def replace(self, **changes: Any) -> Pi05Config:
        return dataclasses.replace(self, **changes)


TINY = Pi05Config(
    name="tiny",
    vision=VisionConfig(width=64, depth=2, num_heads=4, mlp_dim=112),
    vlm=GemmaConfig(width=96, depth=3, mlp_dim=192, num_heads=4, num_kv_heads=1, head_dim=32),
    expert=GemmaConfig(width=48, depth=3, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=32),
    vocab_size=1024,
    action_horizon=10,
    max_token_len=24,
)

# Action spaces of openpi's configs (openpi src/openpi/training/config.py, policies/*_policy.py):
# - pi05_droid: DROID's joint velocities (7) and an absolute gripper position; no delta transform.
# - pi05_full_droid_finetune (joint position): AbsoluteActions(make_bool_mask(7, -1)).
# - pi05_aloha: AbsoluteActions(make_bool_mask(6, -1, 6, -1)): 6 joints delta, gripper absolute, per arm; around
#   it AlohaInputs / AlohaOutputs with adapt_to_pi=True (joint flips, gripper conversion: joint_conventions.py).
# - pi05_libero: LIBERO's end-effector commands, passed through (extra_delta_transform=False): not joint space.
DROID_VELOCITY = ActionSpace((VELOCITY,) * 7 + (ABSOLUTE,))
DROID_JOINT_POSITION = ActionSpace.from_mask([True] * 7 + [False], 8, DELTA)
ALOHA_JOINT_POSITION = ActionSpace.from_mask(([True] * 6 + [False]) * 2, 14, DELTA)
LIBERO_END_EFFECTOR = ActionSpace.uniform(ABSOLUTE, 7, joint_space=False)

PRESETS: dict[str, Pi05Config] = {
    "pi05": Pi05Config(),
    "pi05_droid": Pi05Config(name="pi05_droid", action_horizon=15, action_space=DROID_VELOCITY),
    "pi05_droid_joint_position": Pi05Config(name="pi05_droid_joint_position", action_horizon=16,
                                            action_space=DROID_JOINT_POSITION),
    "pi05_aloha": Pi05Config(name="pi05_aloha", action_space=ALOHA_JOINT_POSITION, joint_convention="aloha_to_pi"),
    "pi05_libero": Pi05Config(name="pi05_libero", action_horizon=10, prompt_format="pi0",
                              action_space=LIBERO_END_EFFECTOR, robot_state_values=8),
    "tiny": TINY,
}

_VARIANTS: dict[str, GemmaConfig] = {"gemma_2b": GEMMA_2B, "gemma_300m": GEMMA_300M}


def preset(name: str) -> Pi05Config:
    """The preset called `name`; the error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(
            f"unknown config preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
        ) from None


def _gemma_from_tiny_dict(d: dict[str, Any]) -> GemmaConfig:
    return GemmaConfig(
        width=d["width"], depth=d["depth"], mlp_dim=d["mlp_dim"], num_heads=d["num_heads"],
        num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", 10_000.0),
    )


def _positive_int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def config_from_dict(raw: dict[str, Any], base: Pi05Config) -> Pi05Config:
    """Overlay what a checkpoint's config.json says (openpi or LeRobot keys) onto `base`. Raises ValueError
    naming the key when a value has the wrong type (load_config turns it into a CheckpointError)."""
    changes: dict[str, Any] = {}
    # openpi keys
    for key in ("action_dim", "action_horizon", "max_token_len"):
        if key in raw:
            changes[key] = _positive_int(raw, key)
    # LeRobot keys
    for key, field_name in (("chunk_size", "action_horizon"), ("max_action_dim", "action_dim"),
                            ("max_state_dim", "max_state_dim"), ("tokenizer_max_length", "max_token_len")):
        if key in raw:
            changes[field_name] = _positive_int(raw, key)
    for key, part in (("paligemma_variant", "vlm"), ("action_expert_variant", "expert")):
        variant = raw.get(key)
        if variant in _VARIANTS:
            changes[part] = _VARIANTS[variant]
    tiny = raw.get("tiny")
    if isinstance(tiny, dict):  # the golden test checkpoint spells out its small dimensions
        v = tiny["vision"]
        changes["vision"] = VisionConfig(
            image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
            depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        )
        changes["vlm"] = _gemma_from_tiny_dict(tiny["vlm"])
        changes["expert"] = _gemma_from_tiny_dict(tiny["expert"])
        changes["vocab_size"] = int(tiny["vlm"]["vocab_size"])
        changes["name"] = "tiny"
    if "image_keys" in raw:
        keys = raw["image_keys"]
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"image_keys must be a list of camera slot names, got {keys!r}")
        changes["image_keys"] = tuple(keys)
    return dataclasses.replace(base, **changes)


def load_config(checkpoint_dir: Path, preset_name: str | None = None) -> Pi05Config:
    """The config of a checkpoint directory: the preset (default `pi05`) overlaid with its config.json."""
    base = preset(preset_name or "pi05")
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return base
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the checkpoint's config.json") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object (got a {type(raw).__name__}); restore the "
                              "checkpoint's config.json")
    if preset_name is None and raw.get("paligemma_variant") == "tiny":
        base = TINY
    try:
        return config_from_dict(raw, base)
    except (KeyError, TypeError, ValueError) as exc:  # a field missing or of the wrong type
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{path}: {what}; restore the checkpoint's config.json") from exc

"""What a LeRobot PI05 checkpoint says about itself: config.json and the processor pipelines' JSON files.

`PI05Policy.save_pretrained` writes config.json (draccus-encoded PI05Config); the processors' `save_pretrained`
writes `policy_preprocessor.json` / `policy_postprocessor.json` (`{"steps": [{"registry_name", "config",
"state_file"}]}`). The processor files are what LeRobot's inference really runs, so they win over config.json
where both say the same thing (normalization modes, relative actions). Facts: lerobot 0.6.1
(`configs/policies.py`, `policies/pi05/configuration_pi05.py`, `processor/normalize_processor.py`,
`processor/relative_action_processor.py`, `processor/pipeline.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pi05_ros.engine.errors import CheckpointError

CAMERA_PREFIX = "observation.images."
# LeRobot PI05's default normalization_mapping (configuration_pi05.py) and NormalizerProcessorStep's eps.
DEFAULT_MODES = {"STATE": "QUANTILES", "ACTION": "QUANTILES"}
DEFAULT_EPS = 1e-8
# config.json keys that only LeRobot >= 0.5.1 writes (the relative-actions fields).
RELATIVE_ACTION_KEYS = ("use_relative_actions", "relative_exclude_joints", "action_feature_names")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore the checkpoint's file") from exc


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    """config.json as a dict ({} when there is none)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object; restore the checkpoint's config.json")
    return raw


def processor_step(checkpoint_dir: Path, pipeline: str, registry_name: str) -> dict[str, Any] | None:
    """The step `registry_name` of `policy_<pipeline>.json` ({"config": ..., "state_file": ...}), or None."""
    path = Path(checkpoint_dir) / f"policy_{pipeline}.json"
    if not path.is_file():
        return None
    raw = _read_json(path)
    steps = raw.get("steps") if isinstance(raw, dict) else None
    if not isinstance(steps, list):
        raise CheckpointError(f"{path} has no list of 'steps'; restore the checkpoint's processor file")
    for step in steps:
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            return {"config": step.get("config") or {}, "state_file": step.get("state_file")}
    return None


@dataclass(frozen=True)
class NormalizationModes:
    state: str
    action: str
    eps: float
    source: str  # which file said so


def _eps(step_config: dict[str, Any], default: float, path: Path) -> float:
    raw = step_config.get("eps", default)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw < 1:
        raise CheckpointError(f"{path}: the normalizer's eps must be a small non-negative number, got {raw!r}; "
                              "restore the processor file")
    return float(raw)


def normalization_modes(checkpoint_dir: Path) -> NormalizationModes:
    """Each feature's mode: the state's from the pre-processor's normalizer step, the action's from the
    post-processor's unnormalizer step; else config.json's `normalization_mapping`; else PI05's defaults."""
    checkpoint_dir = Path(checkpoint_dir)
    pre = processor_step(checkpoint_dir, "preprocessor", "normalizer_processor")
    post = processor_step(checkpoint_dir, "postprocessor", "unnormalizer_processor")
    mapping = read_config(checkpoint_dir).get("normalization_mapping")
    state = action = None
    sources = []
    eps = DEFAULT_EPS
    if pre is not None and isinstance(pre["config"].get("norm_map"), dict):
        state = pre["config"]["norm_map"].get("STATE", "IDENTITY")
        eps = _eps(pre["config"], eps, checkpoint_dir / "policy_preprocessor.json")
        sources.append("policy_preprocessor.json")
    if post is not None and isinstance(post["config"].get("norm_map"), dict):
        action = post["config"]["norm_map"].get("ACTION", "IDENTITY")
        eps = _eps(post["config"], eps, checkpoint_dir / "policy_postprocessor.json")
        sources.append("policy_postprocessor.json")
    if isinstance(mapping, dict) and (state is None or action is None):
        state = state or mapping.get("STATE", "IDENTITY")
        action = action or mapping.get("ACTION", "IDENTITY")
        sources.append("config.json normalization_mapping")
    if state is None or action is None:
        sources.append("LeRobot PI05 defaults")
    return NormalizationModes(str(state or DEFAULT_MODES["STATE"]).upper(),
                              str(action or DEFAULT_MODES["ACTION"]).upper(), eps,
                              " + ".join(dict.fromkeys(sources)))


def relative_action_mask(action_dim: int, exclude_joints: Sequence[str] | None,
                         action_names: Sequence[str] | None) -> list[bool]:
    """LeRobot's relative-action mask (RelativeActionsProcessorStep._build_mask): True = relative to the state.

    All True without exclusions or without action names; else a column is absolute when any exclude token
    equals or is a substring of its lower-cased name; columns past the names are relative.
    """
    tokens = [str(name).lower() for name in exclude_joints or () if name]
    if not tokens or action_names is None:
        return [True] * action_dim
    mask = [not any(t == str(name).lower() or t in str(name).lower() for t in tokens)
            for name in list(action_names)[:action_dim]]
    return mask + [True] * (action_dim - len(mask))


@dataclass(frozen=True)
class RelativeActions:
    enabled: bool
    exclude_joints: tuple[str, ...]
    action_names: tuple[str, ...] | None
    source: str

    def mask(self, action_dim: int) -> list[bool]:
        return relative_action_mask(action_dim, self.exclude_joints, self.action_names)


def relative_actions(checkpoint_dir: Path) -> RelativeActions:
    """Whether LeRobot adds the state back to the actions (its post-processor's absolute_actions_processor),
    and the names that make the mask (the pre-processor's relative_actions_processor, else config.json)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    absolute = processor_step(checkpoint_dir, "postprocessor", "absolute_actions_processor")
    relative = processor_step(checkpoint_dir, "preprocessor", "relative_actions_processor")
    if absolute is not None:
        enabled, source = bool(absolute["config"].get("enabled", False)), "policy_postprocessor.json"
    else:
        enabled, source = bool(config.get("use_relative_actions", False)), "config.json use_relative_actions"
    if relative is not None:
        exclude, names = relative["config"].get("exclude_joints"), relative["config"].get("action_names")
    else:
        exclude, names = config.get("relative_exclude_joints", ["gripper"]), config.get("action_feature_names")
    return RelativeActions(enabled, tuple(exclude or ()), tuple(names) if names is not None else None, source)


def camera_features(checkpoint_dir: Path) -> list[str]:
    """The VISUAL input features in config order (LeRobot's `config.image_features`), including the
    `empty_cameras` LeRobot adds (`observation.images.empty_camera_<i>`, never fed: always masked)."""
    config = read_config(checkpoint_dir)
    features = config.get("input_features") or {}
    empty = config.get("empty_cameras") or 0
    if not isinstance(features, dict) or isinstance(empty, bool) or not isinstance(empty, int) or empty < 0:
        raise CheckpointError(f"{Path(checkpoint_dir) / 'config.json'}: input_features must be an object and "
                              f"empty_cameras a count (got {type(features).__name__}, {empty!r}); restore the "
                              "checkpoint's config.json")
    names = [name for name, spec in features.items() if isinstance(spec, dict) and spec.get("type") == "VISUAL"]
    for i in range(empty):
        name = f"{CAMERA_PREFIX}empty_camera_{i}"
        if name not in names:
            names.append(name)
    return names


def short_camera_name(feature: str) -> str:
    return feature[len(CAMERA_PREFIX):] if feature.startswith(CAMERA_PREFIX) else feature

"""Normalization of robot state and un-normalization of actions from a checkpoint's norm stats.

Pi0.5 uses quantiles: `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`; Pi0 used mean/std. Only the first
`len(stats)` dims are touched, which are the robot's real dims.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pi05_ros.engine.errors import CheckpointError

EPS = 1e-6


@dataclass(frozen=True)
class Stats:
    """Statistics of one quantity (state or actions), each a 1-D float32 array of the robot's dims."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])


@dataclass(frozen=True)
class NormStats:
    state: Stats
    actions: Stats
    use_quantiles: bool = True

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return _normalize(state, self.state, self.use_quantiles)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return _unnormalize(actions, self.actions, self.use_quantiles)


def _normalize(x: np.ndarray, s: Stats, quantiles: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).copy()
    d = min(s.dim, x.shape[-1])
    if quantiles:
        x[..., :d] = (x[..., :d] - s.q01[:d]) / (s.q99[:d] - s.q01[:d] + EPS) * 2.0 - 1.0
    else:
        x[..., :d] = (x[..., :d] - s.mean[:d]) / (s.std[:d] + EPS)
    return x


def _unnormalize(y: np.ndarray, s: Stats, quantiles: bool) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32).copy()
    d = min(s.dim, y.shape[-1])
    if quantiles:
        y[..., :d] = (y[..., :d] + 1.0) / 2.0 * (s.q99[:d] - s.q01[:d] + EPS) + s.q01[:d]
    else:
        y[..., :d] = y[..., :d] * (s.std[:d] + EPS) + s.mean[:d]
    return y


def _stats_from_dict(raw: dict, name: str, path: Path, need_quantiles: bool) -> Stats:
    try:
        fields = {k: np.asarray(raw[k], dtype=np.float32).reshape(-1) for k in ("mean", "std") if k in raw}
        for k in ("q01", "q99"):
            if k in raw:
                fields[k] = np.asarray(raw[k], dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: norm stats for {name!r} are not numeric arrays ({exc})") from exc
    if need_quantiles and not {"q01", "q99"} <= fields.keys():
        raise CheckpointError(f"{path}: {name!r} has no q01/q99; Pi0.5 needs quantile stats "
                              "(or choose mean/std normalization explicitly)")
    if not need_quantiles and not {"mean", "std"} <= fields.keys():
        raise CheckpointError(f"{path}: {name!r} has no mean/std for mean/std normalization")
    dim = next(iter(fields.values())).shape[0]
    nan = np.full(dim, np.nan, dtype=np.float32)
    return Stats(fields.get("mean", nan), fields.get("std", nan), fields.get("q01", nan), fields.get("q99", nan))


def load_norm_stats(path: str | Path, use_quantiles: bool = True) -> NormStats:
    """Read openpi's `norm_stats.json` ({"norm_stats": {"state": {...}, "actions": {...}}})."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"norm stats file {path} does not exist; pass the checkpoint's "
                              "assets/<asset_id>/norm_stats.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({exc})") from exc
    stats = raw.get("norm_stats", raw) if isinstance(raw, dict) else None
    if not isinstance(stats, dict) or "state" not in stats or "actions" not in stats:
        raise CheckpointError(f"{path} has no 'state' and 'actions' entries under 'norm_stats'")
    return NormStats(
        _stats_from_dict(stats["state"], "state", path, use_quantiles),
        _stats_from_dict(stats["actions"], "actions", path, use_quantiles),
        use_quantiles,
    )


def find_norm_stats(checkpoint_dir: Path, asset_id: str | None = None) -> Path:
    """`<checkpoint>/assets/<asset_id>/norm_stats.json`; with no asset id, the only one there is."""
    assets = Path(checkpoint_dir) / "assets"
    if asset_id:
        path = assets / asset_id / "norm_stats.json"
        if not path.is_file():
            raise CheckpointError(f"no norm stats for asset {asset_id!r}: {path} does not exist")
        return path
    found = sorted(assets.glob("*/norm_stats.json")) + sorted(assets.glob("*/*/norm_stats.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"{checkpoint_dir} has no assets/<asset_id>/norm_stats.json; pass norm_stats=<path to norm_stats.json>"
        )
    names = ", ".join(str(p.parent.relative_to(assets)) for p in found)
    raise CheckpointError(f"{checkpoint_dir} has several norm stats ({names}); choose one with norm_stats=<asset id>")


LEROBOT_STATS_GLOBS = ("policy_postprocessor_step_*_unnormalizer_processor.safetensors",
                       "policy_preprocessor_step_*_normalizer_processor.safetensors")


def find_lerobot_norm_stats(checkpoint_dir: Path) -> Path:
    """LeRobot keeps stats in its processor files rather than in assets/."""
    for pattern in LEROBOT_STATS_GLOBS:
        found = sorted(Path(checkpoint_dir).glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(
        f"{checkpoint_dir} has no LeRobot normalizer file ({LEROBOT_STATS_GLOBS[0]}); lerobot/pi05_base ships none: "
        "pass norm_stats=<norm_stats.json of your dataset>"
    )


def load_lerobot_norm_stats(path: str | Path) -> NormStats:
    """Read a LeRobot (un)normalizer processor file: flat keys `observation.state.q01`, `action.q99`, ...

    The mode (QUANTILES or MEAN_STD) comes from the `policy_*processor.json` beside it when present.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        flat = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        feature, stat = key.rsplit(".", 1)
        groups.setdefault(feature, {})[stat] = value
    if "observation.state" not in groups or "action" not in groups:
        raise CheckpointError(f"{path} has no observation.state / action statistics (found {sorted(groups)})")
    use_quantiles = True
    for cfg_file in sorted(path.parent.glob("policy_*processor.json")):
        text = cfg_file.read_text()
        if '"MEAN_STD"' in text and '"QUANTILES"' not in text:
            use_quantiles = False
    return NormStats(
        _stats_from_dict(groups["observation.state"], "observation.state", path, use_quantiles),
        _stats_from_dict(groups["action"], "action", path, use_quantiles),
        use_quantiles,
    )


def find_checkpoint_norm_stats(checkpoint_dir: Path, fmt: str) -> Path:
    """The norm stats a checkpoint carries: `assets/<asset_id>/norm_stats.json`, or for a LeRobot checkpoint
    without assets/ its normalizer processor file. Raises CheckpointError saying what to pass instead."""
    checkpoint_dir = Path(checkpoint_dir)
    if fmt == "lerobot" and not (checkpoint_dir / "assets").is_dir():
        return find_lerobot_norm_stats(checkpoint_dir)
    try:
        return find_norm_stats(checkpoint_dir)
    except CheckpointError as exc:
        if fmt != "openpi" or (checkpoint_dir / "assets").is_dir():
            raise
        raise CheckpointError(
            f"{checkpoint_dir} has no assets/<asset_id>/norm_stats.json (an openpi checkpoint keeps its norm stats "
            "there: copy the training run's assets/ folder beside model.safetensors, or make one with openpi's "
            "scripts/compute_norm_stats.py); or pass norm_stats=<path to norm_stats.json> "
            "(format: docs/checkpoints.md)"
        ) from exc


def resolve_norm_stats(checkpoint_dir: Path, fmt: str, norm_stats: str | Path | None = None,
                       use_quantiles: bool = True) -> NormStats:
    """`norm_stats` as given (a norm_stats.json path, a LeRobot processor .safetensors path or an asset id),
    or, when None, the ones the checkpoint carries (`find_checkpoint_norm_stats`)."""
    if norm_stats is not None:
        path = Path(str(norm_stats)).expanduser()
        if path.suffix == ".json":
            return load_norm_stats(path, use_quantiles=use_quantiles)
        if path.suffix == ".safetensors":
            return load_lerobot_norm_stats(path)
        return load_norm_stats(find_norm_stats(checkpoint_dir, str(norm_stats)), use_quantiles=use_quantiles)
    found = find_checkpoint_norm_stats(checkpoint_dir, fmt)
    if found.suffix == ".safetensors":
        return load_lerobot_norm_stats(found)
    return load_norm_stats(found, use_quantiles=use_quantiles)


def save_norm_stats(path: str | Path, state: Stats, actions: Stats) -> None:
    """Write stats in openpi's norm_stats.json layout (used by tests and the demo model)."""
    def as_dict(s: Stats) -> dict:
        return {k: getattr(s, k).tolist() for k in ("mean", "std", "q01", "q99")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"norm_stats": {"state": as_dict(state), "actions": as_dict(actions)}}, indent=2))

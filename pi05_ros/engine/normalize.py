"""Normalization of robot state and un-normalization of actions from a checkpoint's norm stats.

Each feature (state, actions) has its own mode, and each family its own formulas:

- openpi (norm_stats.json): quantiles for Pi0.5 `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`, mean/std for Pi0
  `(x - mean) / (std + 1e-6)`; the inverses add the same 1e-6 (openpi transforms.py Normalize/Unnormalize).
- LeRobot (processor files): the mode per feature type from the checkpoint's `normalization_mapping`
  (MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10, IDENTITY); eps (1e-8) is added to std when normalizing only, and
  replaces a quantile/min-max range only where that range is exactly 0 (lerobot/processor/normalize_processor.py).

Only the first `len(stats)` dims are touched, which are the robot's real dims.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.lerobot_files import normalization_modes, processor_step

log = logging.getLogger(__name__)

OPENPI_EPS = 1e-6
LEROBOT_EPS = 1e-8
MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10, IDENTITY = "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY"
NORM_MODES = (MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10, IDENTITY)
OPENPI_MODES = (MEAN_STD, QUANTILES, IDENTITY)
# The statistics each mode reads (low, high) or (mean, std).
_MODE_STATS = {MEAN_STD: ("mean", "std"), MIN_MAX: ("min", "max"), QUANTILES: ("q01", "q99"),
               QUANTILE10: ("q10", "q90"), IDENTITY: ()}
OPENPI, LEROBOT = "openpi", "lerobot"
STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max", "q10", "q90")


@dataclass(frozen=True)
class Stats:
    """Statistics of one quantity (state or actions), each a 1-D float32 array of the robot's dims (or None)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    q10: np.ndarray | None = None
    q90: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(next(getattr(self, k) for k in STAT_NAMES if getattr(self, k) is not None).shape[0])

    def present(self) -> tuple[str, ...]:
        return tuple(k for k in STAT_NAMES if getattr(self, k) is not None)


@dataclass(frozen=True)
class NormStats:
    """State and action statistics with each feature's mode and the family whose formulas apply."""

    state: Stats
    actions: Stats
    state_mode: str = QUANTILES
    action_mode: str = QUANTILES
    convention: str = OPENPI  # whose formulas and epsilons: "openpi" or "lerobot"
    eps: float = OPENPI_EPS
    source: str = ""  # where the statistics were read from

    def __post_init__(self) -> None:
        for feature, stats, mode in (("state", self.state, self.state_mode), ("actions", self.actions,
                                                                             self.action_mode)):
            if mode not in NORM_MODES:
                raise CheckpointError(f"unknown normalization mode {mode!r} for {feature}; "
                                      f"choose one of {', '.join(NORM_MODES)}")
            if self.convention == OPENPI and mode not in OPENPI_MODES:
                raise CheckpointError(f"openpi norm stats know only {', '.join(OPENPI_MODES)}, not {mode} "
                                      f"({feature})")
            missing = [k for k in _MODE_STATS[mode] if getattr(stats, k) is None]
            if missing:
                raise CheckpointError(
                    f"{self.source or 'the norm stats'}: {feature} is normalized with {mode} but has no "
                    f"{'/'.join(missing)} statistics; give stats that have them, or choose another mode")
            for k in _MODE_STATS[mode]:  # NaN or inf would pass into every state token or action silently
                bad = np.flatnonzero(~np.isfinite(getattr(stats, k))).tolist()
                if bad:
                    raise CheckpointError(
                        f"{self.source or 'the norm stats'}: {feature}.{k} has NaN/inf at index {bad[:8]}; "
                        "recompute the norm stats")
            if mode == IDENTITY:
                continue
            lo, hi = (getattr(stats, k) for k in _MODE_STATS[mode])
            flat = np.flatnonzero(hi == 0) if mode == MEAN_STD else np.flatnonzero(hi == lo)
            if flat.size:  # legitimate for a joint that never moved; said once, at load
                log.warning("%s: %s has a zero %s at index %s: those values are divided by eps (%g)",
                            self.source or "the norm stats", feature,
                            "std" if mode == MEAN_STD else "range", flat[:8].tolist(), self.eps)

    @property
    def use_quantiles(self) -> bool:
        return self.state_mode == QUANTILES and self.action_mode == QUANTILES

    def with_modes(self, state_mode: str, action_mode: str) -> NormStats:
        return replace(self, state_mode=state_mode, action_mode=action_mode)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return _apply(state, self.state, self.state_mode, self.convention, self.eps, inverse=False)

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        return _apply(actions, self.actions, self.action_mode, self.convention, self.eps, inverse=True)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Robot-unit actions back to the model's units (real-time chunking's previous chunk)."""
        return _apply(actions, self.actions, self.action_mode, self.convention, self.eps, inverse=False)

    def describe(self) -> str:
        eps = ("openpi formulas, +1e-6" if self.convention == OPENPI
               else f"LeRobot formulas, eps {self.eps:g} on std / zero ranges only")
        return f"state {self.state_mode}, actions {self.action_mode} ({eps})"


def unpadded_dim(stats: Stats) -> int:
    """The dims before a trailing run of padding: statistics computed on zero-padded data (openpi's older
    32-dim norm stats) are exactly 0 in every field there. At least 1."""
    fields = [getattr(stats, k) for k in stats.present()]
    padding = np.all([f == 0 for f in fields], axis=0)
    real = np.flatnonzero(~padding)
    return max(int(real[-1]) + 1 if len(real) else 1, 1)


def _apply(x: np.ndarray, s: Stats, mode: str, convention: str, eps: float, inverse: bool) -> np.ndarray:
    """One feature's (un)normalization in float32, in the peer's own order of operations."""
    x = np.asarray(x, dtype=np.float32).copy()
    if mode == IDENTITY:
        return x
    d = min(s.dim, x.shape[-1])
    v = x[..., :d]
    lo_name, hi_name = _MODE_STATS[mode]
    lo, hi = getattr(s, lo_name)[:d], getattr(s, hi_name)[:d]
    f32 = np.float32
    if convention == OPENPI:
        if mode == MEAN_STD:  # lo, hi = mean, std
            out = v * (hi + f32(eps)) + lo if inverse else (v - lo) / (hi + f32(eps))
        else:
            rng = hi - lo + f32(eps)
            out = (v + f32(1.0)) / f32(2.0) * rng + lo if inverse else (v - lo) / rng * f32(2.0) - f32(1.0)
    elif mode == MEAN_STD:
        out = v * hi + lo if inverse else (v - lo) / (hi + f32(eps))
    else:
        rng = hi - lo
        rng = np.where(rng == 0, f32(eps), rng).astype(np.float32)
        if mode == MIN_MAX:
            out = (v + f32(1)) / f32(2) * rng + lo if inverse else f32(2) * (v - lo) / rng - f32(1)
        else:
            out = (v + f32(1.0)) * rng / f32(2.0) + lo if inverse else f32(2.0) * (v - lo) / rng - f32(1.0)
    x[..., :d] = out
    return x


def _stats_from_dict(raw: dict, name: str, path: Path) -> Stats:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: norm stats for {name!r} must be an object of number lists")
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, which NormStats then names
            fields = {k: np.asarray(raw[k], dtype=np.float32).reshape(-1) for k in STAT_NAMES if k in raw}
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: norm stats for {name!r} are not numeric arrays ({exc})") from exc
    if not fields:
        raise CheckpointError(f"{path}: {name!r} has none of the statistics {', '.join(STAT_NAMES)}")
    dims = {k: v.shape[0] for k, v in fields.items()}
    if len(set(dims.values())) != 1:
        raise CheckpointError(f"{path}: the statistics of {name!r} differ in length ({dims}); restore the file")
    return Stats(**fields)


def read_norm_stats_json(path: str | Path) -> tuple[Stats, Stats]:
    """(state, actions) statistics of openpi's `norm_stats.json` ({"norm_stats": {"state": {...}, ...}})."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"norm stats file {path} does not exist; pass the checkpoint's "
                              "assets/<asset_id>/norm_stats.json") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8 text
        raise CheckpointError(f"{path} is not a readable JSON file ({exc})") from exc
    stats = raw.get("norm_stats", raw) if isinstance(raw, dict) else None
    if not isinstance(stats, dict) or "state" not in stats or "actions" not in stats:
        raise CheckpointError(f"{path} has no 'state' and 'actions' entries under 'norm_stats'")
    return _stats_from_dict(stats["state"], "state", path), _stats_from_dict(stats["actions"], "actions", path)


def load_norm_stats(path: str | Path, use_quantiles: bool = True) -> NormStats:
    """openpi's `norm_stats.json` with openpi's formulas: quantiles for both features (Pi0.5), or mean/std
    with `use_quantiles=False` (Pi0)."""
    state, actions = read_norm_stats_json(path)
    mode = QUANTILES if use_quantiles else MEAN_STD
    try:
        return NormStats(state, actions, mode, mode, OPENPI, OPENPI_EPS, str(Path(path).expanduser()))
    except CheckpointError as exc:
        if use_quantiles:
            raise CheckpointError(f"{exc} (Pi0.5 needs quantile stats; or choose mean/std normalization "
                                  "explicitly with use_quantiles=False)") from None
        raise


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
    """LeRobot keeps stats in its processor files rather than in assets/: the file the post-processor's
    unnormalizer step names (its `state_file`), else the first that matches LEROBOT_STATS_GLOBS."""
    for pipeline, step in (("postprocessor", "unnormalizer_processor"), ("preprocessor", "normalizer_processor")):
        found = processor_step(Path(checkpoint_dir), pipeline, step)
        if found is not None and found.get("state_file") and (Path(checkpoint_dir) / found["state_file"]).is_file():
            return Path(checkpoint_dir) / found["state_file"]
    for pattern in LEROBOT_STATS_GLOBS:
        found = sorted(Path(checkpoint_dir).glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(
        f"{checkpoint_dir} has no LeRobot normalizer file ({LEROBOT_STATS_GLOBS[0]}); lerobot/pi05_base ships none: "
        "pass norm_stats=<norm_stats.json of your dataset>"
    )


def load_lerobot_stats(path: str | Path) -> tuple[Stats, Stats]:
    """(state, action) statistics of a LeRobot (un)normalizer processor file (flat keys `observation.state.q01`,
    `action.q99`, ...)."""
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        flat = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        feature, _, stat = key.rpartition(".")
        groups.setdefault(feature, {})[stat] = value
    if "observation.state" not in groups or "action" not in groups:
        raise CheckpointError(f"{path} has no observation.state / action statistics (found {sorted(groups)})")
    return (_stats_from_dict(groups["observation.state"], "observation.state", path),
            _stats_from_dict(groups["action"], "action", path))


def load_lerobot_norm_stats(path: str | Path) -> NormStats:
    """A LeRobot processor file with the modes and eps of the `policy_*processor.json` files beside it
    (engine/lerobot_files.py); QUANTILES for both when there are none."""
    path = Path(path)
    state, actions = load_lerobot_stats(path)
    modes = normalization_modes(path.parent)
    return NormStats(state, actions, modes.state, modes.action, LEROBOT, modes.eps, str(path))


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
                       use_quantiles: bool | None = None) -> NormStats:
    """`norm_stats` as given (a norm_stats.json path, a LeRobot processor .safetensors path or an asset id),
    or, when None, the ones the checkpoint carries (`find_checkpoint_norm_stats`).

    The formulas follow the checkpoint's family: a LeRobot checkpoint normalizes as its processors do, with the
    modes of its own processor files / config.json, whichever statistics file is used; an openpi checkpoint
    with quantiles (or mean/std with `use_quantiles=False`). `use_quantiles` overrides both features' modes.
    """
    if norm_stats is not None:
        path = Path(str(norm_stats)).expanduser()
        if path.suffix not in (".json", ".safetensors"):
            path = find_norm_stats(checkpoint_dir, str(norm_stats))
    else:
        path = find_checkpoint_norm_stats(checkpoint_dir, fmt)
    state, actions = load_lerobot_stats(path) if path.suffix == ".safetensors" else read_norm_stats_json(path)
    if use_quantiles is not None:
        state_mode = action_mode = QUANTILES if use_quantiles else MEAN_STD
    if fmt == "lerobot":
        modes = normalization_modes(Path(checkpoint_dir))
        if use_quantiles is None:
            state_mode, action_mode = modes.state, modes.action
        return NormStats(state, actions, state_mode, action_mode, LEROBOT, modes.eps, str(path))
    if use_quantiles is None:
        state_mode = action_mode = QUANTILES
    return NormStats(state, actions, state_mode, action_mode, OPENPI, OPENPI_EPS, str(path))


def save_norm_stats(path: str | Path, state: Stats, actions: Stats) -> None:
    """Write stats in openpi's norm_stats.json layout (used by tests and the demo model)."""
    def as_dict(s: Stats) -> dict:
        return {k: getattr(s, k).tolist() for k in s.present()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"norm_stats": {"state": as_dict(state), "actions": as_dict(actions)}}, indent=2))

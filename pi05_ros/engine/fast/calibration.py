"""FP8 calibration: the amax recorder, synthetic observations to calibrate on, and the scales file.

Static FP8 scales come from the largest |input| (amax) each linear layer sees over a few observations, run
eagerly in bf16. The pipeline calibrates when it is handed no scales (engine/fast/pipeline.py); this module
reads and writes the scales as `pi05_ros_fp8_calibration.json` so later starts skip that:

    {"amax": {"prefix_blocks.0.gate_up": 3.1, ...}, "fingerprint": {"prefix_blocks.0.gate_up": 0.0123, ...},
     "observations": "synthetic x8"}

`fingerprint` ties a file to the weights it was calibrated on, layer by layer (a replaced or fine-tuned
checkpoint of the same shape must not reuse it); a file that is unreadable, damaged or does not fit means
calibrating again, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch import Tensor

from pi05_ros.engine.config import Pi05Config
from pi05_ros.engine.fast.blocks import FastModel, LinearFn, LinearParams, linear
from pi05_ros.engine.runner import PreparedObservation

log = logging.getLogger(__name__)

CALIBRATION_FILE = "pi05_ros_fp8_calibration.json"
SYNTHETIC_COUNT = 8  # observations calibrated on when none are handed in


# --- where scales live


def user_cache_dir(name: str) -> Path:
    """~/.cache/pi05_ros/<name> (XDG_CACHE_HOME when set); not created here (only writing a file creates it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pi05_ros" / name


def scales_path(checkpoint_dir: Path) -> Path:
    """Where a checkpoint's FP8 scales live: beside it, or in the user cache when that folder is read-only, under
    its name and a hash of its full path (every LeRobot run's folder is called pretrained_model)."""
    if checkpoint_dir.is_dir() and os.access(checkpoint_dir, os.W_OK):
        return checkpoint_dir / CALIBRATION_FILE
    full = str(checkpoint_dir.expanduser().resolve())
    digest = hashlib.sha1(full.encode()).hexdigest()[:12]
    return user_cache_dir(f"{checkpoint_dir.resolve().name or 'checkpoint'}-{digest}") / CALIBRATION_FILE


FINGERPRINT_STRIDE = 997  # every 997th weight of each linear: cheap, and any fine-tuned layer changes its sum


def weights_fingerprint(fast: FastModel) -> dict[str, float]:
    """Per linear layer, the mean |w| over a strided sample of its weights: changes with the weights of any
    layer (an expert-only fine-tune included); computed before any layer is quantized."""
    return {name: float(layer.weight.detach().reshape(-1)[::FINGERPRINT_STRIDE].float().abs().mean())
            for name, layer in fast.linears().items()}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_non_negative(value: object) -> bool:
    """An amax as calibration writes it (0 for a layer that only saw zeros: quantize_fp8 floors it)."""
    return _is_number(value) and math.isfinite(value) and value >= 0


def load_scales(path: Path | None, fast: FastModel) -> dict[str, float] | None:
    """The amax per linear saved at `path`, or None when there is none or it does not fit `fast`'s weights
    (unreadable, damaged, of other weights, or with values that are not finite non-negative numbers)."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not text
        log.warning("%s is unreadable (%s); calibrating again", path, exc)
        return None
    if not isinstance(saved, dict):
        saved = {}
    amax, fingerprint, names = saved.get("amax"), saved.get("fingerprint"), set(fast.linears())
    valid = (isinstance(amax, dict) and set(amax) == names and all(_finite_non_negative(v) for v in amax.values())
             and isinstance(fingerprint, dict) and set(fingerprint) == names
             and all(_is_number(v) for v in fingerprint.values()))
    if valid:
        ours = weights_fingerprint(fast)
        valid = all(math.isclose(fingerprint[n], ours[n], rel_tol=1e-5, abs_tol=1e-9) for n in names)
    if not valid:
        log.warning("%s does not fit these weights; calibrating again", path)
        return None
    log.info("FP8 scales from %s", path)
    return {name: float(value) for name, value in amax.items()}


def save_scales(path: Path, amax: dict[str, float], fingerprint: dict[str, float], observations: str) -> None:
    """Write the scales (creating the folder); a failure is logged: the next start calibrates again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"amax": amax, "fingerprint": fingerprint, "observations": observations},
                                   indent=1))
        log.info("FP8 scales saved to %s", path)
    except OSError as exc:
        log.warning("could not save FP8 scales to %s (%s); next start calibrates again", path, exc)


# --- what to calibrate on


def synthetic_observations(cfg: Pi05Config, count: int, views: int = 2,
                           seed: int = 0) -> Iterable[PreparedObservation]:
    """Smooth random images (natural-image-like low frequencies, not white noise), random tokens and noise."""
    import cv2

    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    for _ in range(count):
        images = []
        for _ in range(views):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
            images.append(np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8))
        n_text = int(rng.integers(20, min(80, cfg.max_token_len) + 1))
        tokens = np.zeros(cfg.max_token_len, np.int64)
        tokens[:n_text] = rng.integers(4, min(cfg.vocab_size, 32_000), n_text)
        tokens[0] = 2
        mask = np.arange(cfg.max_token_len) < n_text
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        yield PreparedObservation(images + [None] * (len(cfg.image_keys) - views), tokens, mask, noise)


# --- the recorder


class AmaxRecorder:
    """A `linear` that notes the largest |input| per layer before calling the one it wraps."""

    def __init__(self, fast: FastModel, inner: LinearFn = linear) -> None:
        self._names = {layer.weight.data_ptr(): name for name, layer in fast.linears().items()}
        self._inner = inner
        self.amax: dict[str, float] = {}

    def __call__(self, x: Tensor, p: LinearParams) -> Tensor:
        name = self._names[p[0].data_ptr()]
        self.amax[name] = max(self.amax.get(name, 0.0), float(x.detach().abs().max()))
        return self._inner(x, p)


@contextmanager
def record_input_amax(fast: FastModel, inner: LinearFn = linear) -> Iterator[dict[str, float]]:
    """Within the block, runs of `fast` record the largest |input| of every linear (eagerly, through `inner`);
    the yielded dict holds them by module name."""
    recorder = AmaxRecorder(fast, inner)
    with fast.linears_through(recorder):
        yield recorder.amax

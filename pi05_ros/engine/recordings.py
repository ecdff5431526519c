"""Recorded observations on disk, to calibrate FP8 scales on a robot's own data.

One `.npz` file per observation: `image.<slot>` (uint8 HxWx3 RGB, e.g. `image.base_0_rgb`), `state` (float,
robot units) and `prompt` (a 0-d string array). `save_observation` writes that layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.preprocess import validate_image

Recorded = tuple[dict[str, np.ndarray], np.ndarray, str]  # images by model slot, state, prompt


def save_observation(path: str | Path, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str) -> Path:
    """Write one observation as `path` (.npz). Raises InputError for what a policy would refuse (a float image
    would be stored black, an int one wrapped around: neither is cast)."""
    arrays = {f"image.{slot}": validate_image(image, slot) for slot, image in images.items()}
    state = np.asarray(state)
    if state.ndim != 1 or not np.issubdtype(state.dtype, np.number) or not np.all(np.isfinite(state)):
        raise InputError(f"state must be a 1-D vector of finite numbers, got {state.dtype} {state.shape}")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, state=state.astype(np.float32), prompt=np.array(prompt), **arrays)
    return path


def recording_files(folder: str | Path) -> list[Path]:
    """The observation files of `folder`; raises CheckpointError when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"calibration folder {folder} does not exist; pass a folder of recorded .npz "
                              "observations (see pi05_ros.engine.recordings.save_observation)")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise CheckpointError(f"calibration folder {folder} holds no .npz observations")
    return files


def load_observations(folder: str | Path, limit: int = 32) -> list[tuple[Path, Recorded]]:
    """Up to `limit` observations from `folder` with their files, each checked for the fields calibration
    needs. Raises CheckpointError naming the file for anything that is not one (a truncated or empty file, a .npy
    renamed, a prompt that is not text)."""
    out = []
    for path in recording_files(folder)[:limit]:
        try:
            with np.load(path, allow_pickle=False) as data:
                images = {key[len("image."):]: data[key] for key in data.files if key.startswith("image.")}
                state, prompt = data["state"], data["prompt"]
        except Exception as exc:  # noqa: BLE001 - zipfile, EOF, pickle and key errors all mean: not one
            raise CheckpointError(f"{path} is not a recorded observation ({type(exc).__name__}: {exc}); it needs "
                                  "image.<slot>, state and prompt arrays (save_observation writes them)") from exc
        if not images:
            raise CheckpointError(f"{path} has no image.<slot> arrays")
        if prompt.ndim != 0 or prompt.dtype.kind != "U":
            raise CheckpointError(f"{path}: prompt must be a text scalar (np.array('pick up the cup')), got "
                                  f"{prompt.dtype} {prompt.shape}")
        out.append((path, (images, state, str(prompt))))
    return out

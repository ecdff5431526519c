"""Recorded observations on disk, to calibrate FP8 scales on a robot's own data.

One `.npz` file per observation: `image.<slot>` (uint8 HxWx3 RGB, e.g. `image.base_0_rgb`), `state` (float,
robot units) and `prompt` (a 0-d string array). `save_observation` writes that layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pi05_ros.engine.errors import CheckpointError

Recorded = tuple[dict[str, np.ndarray], np.ndarray, str]  # images by model slot, state, prompt


def save_observation(path: str | Path, images: Mapping[str, np.ndarray], state: np.ndarray, prompt: str) -> Path:
    """Write one observation as `path` (.npz)."""
    path = Path(path).with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"image.{slot}": np.asarray(image, dtype=np.uint8) for slot, image in images.items()}
    np.savez_compressed(path, state=np.asarray(state, dtype=np.float32), prompt=np.array(prompt), **arrays)
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


def load_observations(folder: str | Path, limit: int = 32) -> list[Recorded]:
    """Up to `limit` observations from `folder`, each checked for the fields calibration needs."""
    out = []
    for path in recording_files(folder)[:limit]:
        try:
            with np.load(path, allow_pickle=False) as data:
                images = {key[len("image."):]: data[key] for key in data.files if key.startswith("image.")}
                state, prompt = data["state"], str(data["prompt"])
        except (KeyError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a recorded observation ({exc}); it needs image.<slot>, state "
                                  "and prompt arrays") from exc
        if not images:
            raise CheckpointError(f"{path} has no image.<slot> arrays")
        out.append((images, state, prompt))
    return out

"""Recorded observations for FP8 calibration: the on-disk layout and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.errors import CheckpointError
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.recordings import load_observations, save_observation


def test_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    save_observation(tmp_path / "obs_000", {"base_0_rgb": image}, np.arange(7.0), "put the cup in the sink")
    [(images, state, prompt)] = load_observations(tmp_path)
    np.testing.assert_array_equal(images["base_0_rgb"], image)
    np.testing.assert_array_equal(state, np.arange(7, dtype=np.float32))
    assert prompt == "put the cup in the sink"


def test_errors(tmp_path: Path, tiny_checkpoint: Path, tokenizer_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_observations(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no .npz"):
        load_observations(tmp_path)
    np.savez(tmp_path / "bad.npz", state=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a recorded observation"):
        load_observations(tmp_path)
    # a bad folder is reported at load time, on any device
    with pytest.raises(CheckpointError, match="does not exist"):
        Policy.load(tiny_checkpoint, tokenizer_path, device="cpu", calibration_data=tmp_path / "nope")

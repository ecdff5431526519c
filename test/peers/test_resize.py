"""Each family's resize-with-pad against the family's own function: openpi-client's resize_with_pad and
LeRobot's resize_with_pad_torch, run in their venvs on the same uint8 frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peers import HERE, run_peer

from pi05_ros.engine.preprocess import resize_with_pad, to_model_range


def frames() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1).astype(np.uint8)
    return {
        "noise_480x640": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "smooth_480x640": smooth,
        "hd_720x1280": rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8),
        "tall_300x101": rng.integers(0, 256, (300, 101, 3), dtype=np.uint8),
        "small_112x150": rng.integers(0, 256, (112, 150, 3), dtype=np.uint8),  # upscaled
        "square_224": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def frames_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frames.npz"
    np.savez(path, **frames())
    return path


def test_openpi_client_resize_is_openpi_clients_own(openpi_client_python: Path, frames_file: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "openpi_client.npz"
    run_peer(openpi_client_python, HERE / "openpi_client_resize.py", frames_file, out)
    theirs = np.load(out)
    for key, frame in frames().items():
        ours = resize_with_pad(frame, 224, "openpi_client")
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs[key], err_msg=key)  # the same PIL resample: bit-exact
    # openpi's server-side ResizeImages calls the same openpi_client function: the same bits
    for key, frame in frames().items():
        np.testing.assert_array_equal(resize_with_pad(frame, 224, "openpi_server"), theirs[key], err_msg=key)


def test_lerobot_resize_is_lerobots_own(lerobot_python: Path, frames_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lerobot.npz"
    run_peer(lerobot_python, HERE / "lerobot_reference.py", "resize", "--frames", frames_file, "--out", out)
    theirs = np.load(out)
    for key, frame in frames().items():
        ours = to_model_range(resize_with_pad(frame, 224, "lerobot")).transpose(1, 2, 0)
        # float32 on both sides; torch 2.13 here, 2.11 there: ~1e-7 measured
        np.testing.assert_allclose(ours, theirs[key], rtol=0, atol=1e-6, err_msg=key)

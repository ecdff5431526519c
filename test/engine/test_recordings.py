"""Recorded observations for FP8 calibration: the on-disk layout and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pi05_ros.engine.errors import CheckpointError, InputError
from pi05_ros.engine.policy import Policy
from pi05_ros.engine.recordings import load_observations, save_observation


def test_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    save_observation(tmp_path / "obs_000", {"base_0_rgb": image}, np.arange(7.0), "put the cup in the sink")
    [(path, (images, state, prompt))] = load_observations(tmp_path)
    assert path == tmp_path / "obs_000.npz"
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



@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_bytes(b""), "EOFError|BadZipFile|not a recorded observation"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated archive"), "not a recorded observation"),
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), "not a recorded observation"),
    (lambda p: np.savez(p, **{"image.base_0_rgb": np.zeros((8, 8, 3), np.uint8), "state": np.zeros(7),
                              "prompt": np.array(["pick up"])}), "prompt must be a text scalar"),
    (lambda p: np.savez(p, **{"image.base_0_rgb": np.zeros((8, 8, 3), np.uint8), "state": np.zeros(7),
                              "prompt": np.array(b"pick up")}), "prompt must be a text scalar"),
])
def test_a_damaged_or_foreign_file_is_named(tmp_path: Path, write, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "obs_000.npz"
    write(path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_observations(tmp_path)
    assert str(path) in str(error.value)


def test_saving_refuses_what_it_would_store_wrongly(tmp_path: Path) -> None:
    for image in (np.full((8, 8, 3), 0.5, np.float32), np.full((8, 8, 3), 300, np.int32)):  # black / wrapped
        with pytest.raises(InputError):
            save_observation(tmp_path / "x", {"base_0_rgb": image}, np.zeros(7), "pick")
    with pytest.raises(InputError, match="finite"):
        save_observation(tmp_path / "x", {"base_0_rgb": np.zeros((8, 8, 3), np.uint8)}, np.full(7, np.nan), "pick")
    assert not list(tmp_path.glob("*.npz"))


def test_recordings_a_policy_refuses_are_named_and_calibration_leaves_the_seeded_noise(tmp_path: Path) -> None:
    policy = Policy.demo(device="cpu")
    image = np.zeros((60, 80, 3), np.uint8)
    save_observation(tmp_path / "obs_000", {"base_0_rgb": image}, np.zeros(7), "pick")
    before = Policy.demo(device="cpu").infer({"base_0_rgb": image}, np.zeros(7), "pick", 2).actions
    assert len(policy.recorded_observations(tmp_path)) == 1
    after = policy.infer({"base_0_rgb": image}, np.zeros(7), "pick", 2).actions
    np.testing.assert_array_equal(after, before)  # the first start (which calibrates) = later starts
    save_observation(tmp_path / "obs_001", {"base_0_rgb": image}, np.zeros(5), "pick")  # another robot's state
    with pytest.raises(CheckpointError, match=r"recorded observation .*obs_001.npz: state has 5 values"):
        policy.recorded_observations(tmp_path)

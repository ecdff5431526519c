"""FP8 scales on disk (engine/fast/calibration.py): a saved file is reused only for the weights it was made
for, a bad file means calibrating again, and nothing is written (no folder either) unless scales are saved."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from pi05_ros.engine.fast.blocks import FastModel, sample_eager
from pi05_ros.engine.fast.calibration import (
    CALIBRATION_FILE,
    load_scales,
    record_input_amax,
    save_scales,
    scales_path,
    weights_fingerprint,
)
from pi05_ros.engine.reference import Pi05Model


@pytest.fixture(scope="module")
def calibrated(golden_model: Pi05Model, fast_case) -> tuple[FastModel, dict[str, float]]:  # noqa: ANN001
    fast = FastModel(golden_model, torch.bfloat16)
    with record_input_amax(fast) as amax:
        sample_eager(fast, *fast_case(0), 3)
    return fast, dict(amax)


def test_saved_scales_come_back_for_the_same_weights(calibrated, tmp_path: Path) -> None:  # noqa: ANN001
    fast, amax = calibrated
    assert set(amax) == set(fast.linears()) and all(v > 0 for v in amax.values())
    path = tmp_path / "new_folder" / CALIBRATION_FILE
    save_scales(path, amax, weights_fingerprint(fast), "synthetic x8")
    assert load_scales(path, fast) == amax


def test_scales_of_other_weights_are_not_reused(calibrated, tiny_model: Pi05Model, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    fast, amax = calibrated
    path = tmp_path / CALIBRATION_FILE
    save_scales(path, amax, weights_fingerprint(fast), "synthetic x8")
    other = FastModel(tiny_model, torch.bfloat16)  # same shapes and layer names, other weights
    assert set(other.linears()) == set(amax)
    with caplog.at_level(logging.WARNING):
        assert load_scales(path, other) is None
    assert "does not fit these weights" in caplog.text


@pytest.mark.parametrize(("content", "message"), [("{", "unreadable"), ("[1, 2]", "does not fit"),
                                                  ('{"amax": {"vision_blocks.0.qkv": 1.0}}', "does not fit"),
                                                  ('{"amax": 5, "fingerprint": null}', "does not fit"),
                                                  ('{"amax": {}, "fingerprint": "x"}', "does not fit"),
                                                  (b"\xff\xfe\x00garbage", "unreadable")])
def test_a_bad_scales_file_means_calibrating_again(calibrated, tmp_path: Path, content: str, message: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    path = tmp_path / CALIBRATION_FILE
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert load_scales(path, calibrated[0]) is None
    assert message in caplog.text
    assert load_scales(tmp_path / "missing.json", calibrated[0]) is None and load_scales(None, calibrated[0]) is None


def test_scales_with_values_that_are_not_finite_non_negative_numbers_are_not_used(calibrated, tmp_path: Path) -> None:  # noqa: ANN001,E501
    fast, amax = calibrated
    name = next(iter(amax))
    for bad in (float("nan"), float("inf"), -1.0, "3.0", True):
        path = tmp_path / CALIBRATION_FILE
        path.write_text(json.dumps({"amax": amax | {name: bad}, "fingerprint": weights_fingerprint(fast)}))
        assert load_scales(path, fast) is None, bad
    path.write_text(json.dumps({"amax": amax | {name: 0.0}, "fingerprint": weights_fingerprint(fast)}))
    assert load_scales(path, fast)[name] == 0.0  # a layer that only saw zeros: as calibration saves it


def test_scales_are_not_reused_after_an_expert_only_fine_tune(calibrated, tmp_path: Path) -> None:  # noqa: ANN001
    """LeRobot's train_expert_only changes no VLM layer: every layer's weights take part in the fingerprint."""
    fast, amax = calibrated
    path = tmp_path / CALIBRATION_FILE
    save_scales(path, amax, weights_fingerprint(fast), "synthetic x8")
    tuned = copy.deepcopy(fast)
    with torch.no_grad():
        tuned.expert_blocks[-1].down.weight.mul_(3.0)
    assert load_scales(path, tuned) is None and load_scales(path, fast) == amax


def test_read_only_checkpoints_of_the_same_name_keep_their_own_scales(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pi05_ros.engine.fast import calibration

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "run1" / "pretrained_model", tmp_path / "run2" / "pretrained_model"
    for folder in (first, second):
        folder.mkdir(parents=True)
    assert scales_path(first) == first / CALIBRATION_FILE  # writable: beside the checkpoint
    # read-only (as a mounted dataset; the check itself is replaced: CI may run as root, who can write anywhere)
    monkeypatch.setattr(calibration.os, "access", lambda path, mode: False)
    a, b = scales_path(first), scales_path(second)
    assert a != b and a.parent.parent == tmp_path / "cache" / "pi05_ros"
    assert a.parent.name.startswith("pretrained_model-") and scales_path(first) == a  # stable


def test_scales_live_beside_a_writable_checkpoint_else_in_the_user_cache(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert scales_path(tmp_path) == tmp_path / CALIBRATION_FILE
    elsewhere = scales_path(tmp_path / "not_here" / "pi05_droid")
    assert elsewhere.parent.parent == tmp_path / "home" / ".cache" / "pi05_ros"
    assert elsewhere.parent.name.startswith("pi05_droid-") and elsewhere.name == CALIBRATION_FILE
    assert not (tmp_path / "home").exists()  # only saving creates the folder


def test_cpu_demo_leaves_no_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pi05_ros.engine.policy import Policy

    monkeypatch.setenv("HOME", str(tmp_path))
    policy = Policy.demo(device="cpu")
    assert policy.runner.name == "reference"
    assert not (tmp_path / ".cache").exists()

"""Session-wide test setup shared by test/engine, test/gpu and test/ros."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# openpi's outputs on a tiny random-weight Pi0.5 (test/data/golden/pi05_tiny/README.md says how they were made).
GOLDEN_DIR = REPO_ROOT / "test" / "data" / "golden" / "pi05_tiny"


def _pi05_location() -> str:
    spec = importlib.util.find_spec("pi05_ros")
    if spec is None or not spec.submodule_search_locations:
        return "not importable"
    return str(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert (GOLDEN_DIR / "model.safetensors").is_file(), f"golden data missing at {GOLDEN_DIR}: incomplete checkout"
    return GOLDEN_DIR


def pytest_report_header(config: pytest.Config) -> list[str]:
    # Shows at a glance whether the installed (with .msg) or the source copy of pi05_ros is in use.
    return [f"pi05_ros imported from: {_pi05_location()}"]


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PI05_REQUIRE_ROS") != "1":
        return
    # scripts/test.sh sets PI05_REQUIRE_ROS=1: there the ROS tests must run against the colcon install.
    location = _pi05_location()
    msg_spec = importlib.util.find_spec("pi05_ros.msg") if location != "not importable" else None
    if msg_spec is None:
        raise pytest.UsageError(
            f"pi05_ros.msg is not importable (pi05_ros found at {location}). The tests need the colcon "
            "install: run `bash scripts/setup.sh`, then `source scripts/env.sh`, then `pytest` "
            "(not `python -m pytest`, which puts the source tree's msg-less pi05_ros first)."
        )

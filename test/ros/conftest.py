"""Fixtures for the ROS tests: real rclpy over DDS on loopback, the node in a subprocess, no mocks.

`scripts/test.sh` sets a random ROS_DOMAIN_ID per run and ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST; each
node under test also gets its own namespace, so tests never hear each other's topics.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The test modules import ros_harness.py from this folder (importlib import mode adds no folder to sys.path;
# this one holds no package, so nothing here can shadow the installed pi05_ros).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ros_harness import Driver  # noqa: E402

_ROS_MISSING = importlib.util.find_spec("rclpy") is None
if _ROS_MISSING and os.environ.get("PI05_REQUIRE_ROS") != "1":
    # On a machine with only `pip install -e .[test]` the ROS tests cannot run; say so instead of failing.
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _ROS_MISSING:
        return ["ROS tests: skipped, rclpy is not importable (source scripts/env.sh to run them)"]
    return [
        f"ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')} "
        f"ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', '(unset)')}"
    ]


@pytest.fixture
def driver_factory() -> Iterator[Callable[..., Driver]]:
    drivers: list[Driver] = []

    def make(namespace: str, **kwargs: Any) -> Driver:
        driver = Driver(namespace, **kwargs)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()

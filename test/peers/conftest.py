"""The peers: the real LeRobot 0.6.1 and openpi-client packages, each in its own venv (scripts/peers.sh), run
as subprocesses that write reference outputs; the tests compare the engine against them (peers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules import peers.py from this folder (importlib import mode adds no folder to sys.path; this one
# holds no package, so nothing here can shadow the installed pi05_ros).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import HERE, peer_python, run_peer  # noqa: E402


@pytest.fixture(scope="session")
def lerobot_python() -> Path:
    return peer_python("PI05_LEROBOT_PYTHON")


@pytest.fixture(scope="session")
def openpi_client_python() -> Path:
    return peer_python("PI05_OPENPI_CLIENT_PYTHON")


@pytest.fixture(scope="session")
def lerobot_cases(lerobot_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case's LeRobot checkpoint and io.npz (test/peers/lerobot_reference.py), made once per session."""
    out = tmp_path_factory.mktemp("lerobot")
    run_peer(lerobot_python, HERE / "lerobot_reference.py", "policies", "--out", out)
    return out

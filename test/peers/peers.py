"""Where the peer venvs are and how their scripts run (conftest.py holds the fixtures).

The venvs' pythons come from PI05_LEROBOT_PYTHON / PI05_OPENPI_CLIENT_PYTHON, or from the .peers.env that
scripts/peers.sh writes. scripts/test.sh sets PI05_REQUIRE_PEERS=1: there a missing peer fails the run; a plain
`pytest` elsewhere skips these tests with the command that builds the peers.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PEERS_ENV = HERE.parents[1] / ".peers.env"
LEROBOT_CASES = ("quantiles", "mean_std", "mixed", "relative", "missing_camera", "camera_480x640")


def peer_python(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value and PEERS_ENV.is_file():
        for line in PEERS_ENV.read_text().splitlines():
            words = shlex.split(line)
            if len(words) == 2 and words[0] == "export" and words[1].startswith(variable + "="):
                value = words[1].split("=", 1)[1]
    if value and Path(value).is_file():
        return Path(value)
    why = f"{variable} is not set and no peer venv is built: run `bash scripts/peers.sh`"
    if os.environ.get("PI05_REQUIRE_PEERS") == "1":
        pytest.fail(why)
    pytest.skip(why)


def run_peer(python: Path, *args: str | Path, timeout: float = 600) -> None:
    """Run a peer script; its output is shown only when it fails."""
    # a clean environment: nothing of the project's venv, ROS overlay or library paths reaches the peer
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    result = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd="/tmp")
    if result.returncode != 0:
        raise AssertionError(f"{python} {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")



"""Fixtures for the serving tests: a tiny checkpoint with DROID's sizes (state 7 joints + gripper, 8 actions),
`pi05-serve` in subprocesses on loopback, the local Policy to compare with, the real openpi client's venv."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The test modules import serve_harness.py from this folder (importlib import mode adds no folder to sys.path),
# and the peer venvs are found as test/peers finds them.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))

from peers import peer_python  # noqa: E402
from serve_harness import OneThreadPolicy, ServerProcess  # noqa: E402

from pi05_ros.engine.config import TINY  # noqa: E402
from pi05_ros.engine.demo import demo_norm_stats, demo_tokenizer, random_model, write_checkpoint  # noqa: E402
from pi05_ros.engine.policy import Policy  # noqa: E402

DROID_DOF = 8  # openpi's DROID: 7 joint positions + the gripper in the state, 8 action columns


@pytest.fixture(scope="session")
def serve_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_tokenizer(tmp_path_factory.mktemp("serve_tok"))


@pytest.fixture(scope="session")
def droid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = random_model(TINY.replace(max_token_len=96), seed=11)
    return write_checkpoint(model, tmp_path_factory.mktemp("serve_ckpt") / "tiny_droid",
                            norm_stats=demo_norm_stats(DROID_DOF))


@pytest.fixture(scope="session")
def model_args(droid_checkpoint: Path, serve_tokenizer: Path) -> list[str]:
    """pi05-serve's model arguments; one torch thread leaves the other core to the clients."""
    return ["--checkpoint", str(droid_checkpoint), "--tokenizer", str(serve_tokenizer), "--device", "cpu",
            "--threads", "1"]


@pytest.fixture(scope="session")
def local_policy(droid_checkpoint: Path, serve_tokenizer: Path) -> OneThreadPolicy:
    return OneThreadPolicy(Policy.load(droid_checkpoint, serve_tokenizer, device="cpu"))


@pytest.fixture(scope="session")
def openpi_client_python() -> Path:
    """The real openpi-client 0.1.2 (numpy 1.26) in its own venv, built by scripts/peers.sh."""
    return peer_python("PI05_OPENPI_CLIENT_PYTHON")


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(args, env=None): pi05-serve with `args` (and `env` variables), stopped (SIGINT) after the
    module's tests."""
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, cwd=tmp_path_factory.mktemp("server_cwd"), env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, "\n".join(server.lines[-40:])

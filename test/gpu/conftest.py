"""GPU tests run only on the device machine (`pytest -m gpu test/gpu`); CI deselects them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
_exit_status: int | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Skipped at collection, so that module fixtures which build CUDA models are never set up without a GPU.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """On a GPU, end the process once pytest has reported (its summary is out by now). At interpreter exit,
    inductor's compile-worker pool waited on its subprocess for minutes after every test had passed, until the
    device step's time limit killed it (docs/benchmarks.md §63): device time spent on nothing."""
    if _exit_status is not None and torch.cuda.is_available():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)

"""GPU tests run only on the device machine (`pytest -m gpu test/gpu`); CI deselects them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Skipped at collection, so that module fixtures which build CUDA models are never set up without a GPU.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)

"""GPU tests run only on the device machine (`pytest -m gpu test/gpu`); CI deselects them."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")

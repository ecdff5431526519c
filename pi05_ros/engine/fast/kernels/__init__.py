"""Triton kernels of the fast path, each with the plain-torch definition it is tested against.

Triton is optional: `available()` says whether these kernels can run here. Where they cannot (no Triton, or
a GPU they have not been built for), the fast path keeps its torch.compile'd layer functions.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run as numpy programs, for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the fused expert kernels can run on `device`: CUDA with Triton, or the CPU interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and interpreting()


# The compute dtypes the kernels take (their DT constexpr).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def tl_dtype(dtype: torch.dtype):  # noqa: ANN201 - a triton.language dtype; Triton is imported only when needed
    """Triton's element type for one of KERNEL_DTYPES."""
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]

"""Triton kernels of the fast path, each with the plain-torch definition it is tested against.

Triton is optional: `available()` says whether these kernels can run here. Where they cannot (no Triton, or
a GPU they have not been built for), the fast path keeps its torch.compile'd layer functions.
"""

from __future__ import annotations

import functools
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


# The GPU family the kernels were measured on, and measured faster than the torch.compile path where they are
# defaults: Hopper (H100, H200; docs/benchmarks.md §20, §48, §51, §70). Elsewhere they run only when asked.
MEASURED_MAJOR = 9


def capability_major(device: torch.device) -> int:
    """The CUDA compute capability's major number of `device` (9 on Hopper), looked up once per GPU."""
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def measured_on(device: torch.device) -> bool:
    """Whether `device` is of the GPU family the kernels were measured on (MEASURED_MAJOR)."""
    return device.type == "cuda" and capability_major(device) == MEASURED_MAJOR


# The compute dtypes the kernels take (their DT constexpr).
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def tl_dtype(dtype: torch.dtype):  # noqa: ANN201 - a triton.language dtype; Triton is imported only when needed
    """Triton's element type for one of KERNEL_DTYPES."""
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]

"""The fused expert kernels and the flash attention kernel compile for Hopper (sm_90) without a GPU: Triton's
compiler for that target, the full-size model's tile shapes (tools/compile_kernels.py). The interpreter tests check
their math, not that the GPU compiler takes them, that a program fits an SM, or that the default shapes (batch 1's
and batches') compile without spilling registers."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compile_kernels.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def test_every_expert_kernel_compiles_for_hopper_and_fits_an_sm() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(TOOL), "--arch", "90"], capture_output=True, text=True, env=env,
                            timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "kernel" not in line]
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]
    batch = "batch 2x1, 8 warps, 3 stages"  # KernelConfig's batch shape
    assert [c[0] for c in cells] == ["gemm qkv", "gemm o", "gemm gate_up", "gemm down", "attend", "combine",
                                     # Hopper's walk (attention.key_walk), then the other
                                     "flash attention, one split, runs walk",
                                     "flash attention, 4 key splits, runs walk",
                                     "flash attention, 4 key splits, skip walk (option)", "flash combine",
                                     "fp8 gate_up + GeGLU, tiles 128x128x128, 8 warps, 3 stages, MMA accumulation",
                                     "fp8 gate_up + GeGLU, tiles 128x128x128, 8 warps, 3 stages, float32 sums per K "
                                     "step (option)",
                                     "fp8 fc1 + bias + GELU, tiles 128x256x128, 8 warps, 3 stages",
                                     f"gemm qkv {batch}", f"gemm o {batch}", f"gemm gate_up {batch}",
                                     f"gemm down {batch}"]
    assert all(c[5] == "yes" for c in cells)
    # options the defaults do not take may spill a little (the GeGLU kernel's float32 sums: 16 bytes, Triton 3.9)
    assert all(c[2] == "0" for c in cells if "(option)" not in c[0]), "a default kernel spills registers"


def _stream_floor_tool():
    """tools/stream_floor_gpu.py as a module; the import path it adds for itself is taken back after."""
    saved = list(sys.path)
    sys.path.insert(0, str(TOOL.parent))
    try:
        import stream_floor_gpu
    finally:
        sys.path[:] = saved
    return stream_floor_gpu


@pytest.mark.skipif(_stream_floor_tool().find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
def test_the_stream_floor_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    """tools/stream_floor's CUDA kernel (Hopper bulk copies, mbarriers) builds for sm_90a through the tool's own
    build, and its launcher loads with the argument types the tool gives it."""
    library = _stream_floor_tool().build(tmp_path)
    assert library.stream_floor_launch.restype is ctypes.c_int

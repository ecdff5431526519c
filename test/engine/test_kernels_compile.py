"""The fused expert kernels and the flash attention kernel compile for Hopper (sm_90) without a GPU: Triton's
compiler for that target, the full-size model's tile shapes (tools/compile_kernels.py). The interpreter tests check
their math, not that the GPU compiler takes them, that a program fits an SM, or that the default shapes (batch 1's
and batches') compile without spilling registers."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
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
                                     "flash attention, one split", "flash attention, 4 key splits", "flash combine",
                                     f"gemm qkv {batch}", f"gemm o {batch}", f"gemm gate_up {batch}",
                                     f"gemm down {batch}"]
    assert all(c[5] == "yes" for c in cells)
    assert all(c[2] == "0" for c in cells), "a default kernel spills registers"


@pytest.mark.skipif(not (shutil.which("nvcc") or glob.glob("/usr/local/cuda*/bin/nvcc")), reason="needs nvcc")
def test_the_stream_floor_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    """tools/stream_floor's CUDA kernel (Hopper bulk copies, mbarriers) builds as tools/stream_floor_gpu.py builds it
    on the GPU machine, and exports its launcher."""
    nvcc = shutil.which("nvcc") or sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))[0]
    lib = tmp_path / "stream_floor.so"
    source = TOOL.parent / "stream_floor" / "stream_floor.cu"
    subprocess.run([nvcc, "-arch=sm_90a", "-O3", "-shared", "-Xcompiler", "-fPIC", "-o", str(lib), str(source)],
                   check=True, timeout=300)
    symbols = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True, check=True).stdout
    assert " T stream_floor_launch" in symbols

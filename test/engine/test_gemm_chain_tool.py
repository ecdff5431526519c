"""tools/gemm_chain_gpu.py's persistent GEMM-chain kernel without a GPU: the host's weight packing and activation
layout, composed with the kernel's indexing (emulated index for index in numpy, the mma's fragment layout from the
PTX ISA), give the GEMM; the kernel builds for sm_90a. Its numerics on the GPU: the tool checks itself against torch
before it times anything."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool():
    """tools/gemm_chain_gpu.py as a module; the import paths it adds for itself are taken back after."""
    saved = list(sys.path)
    sys.path.insert(0, str(TOOLS))
    try:
        import gemm_chain_gpu
    finally:
        sys.path[:] = saved
    return gemm_chain_gpu


@pytest.mark.parametrize(("m", "k", "n", "ctas", "tile_n"),
                         [(50, 128, 512, 3, 256), (64, 64, 256, 1, 256), (1, 96, 256, 5, 256),
                          (50, 256, 256, 3, 128), (50, 512, 128, 3, 64), (7, 256, 128, 4, 64)])
def test_packing_and_kernel_indexing_compose_into_the_gemm(m: int, k: int, n: int, ctas: int, tile_n: int) -> None:
    """Units 256 wide x 32 deep, 128 x 64 and 64 x 128 (two and four activation chunks a unit). 3 CTAs over 8 units
    split n-tiles mid-K (a partial sum flushed by two CTAs); 5 CTAs over 3 units leave two without work; M = 50, 7
    and 1 leave rows of the 64 unused, M = 64 none."""
    tool = _tool()
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    got = tool.emulate_gemm(tool.pack_weight(w, tile_n).numpy(), tool.pack_activation(x).numpy(), m, k, n, ctas,
                            tile_n)
    want = x.to(torch.bfloat16).double() @ w.double().t()
    # float64 sums of the same bf16 products in another order: ~1e-15 relative; 1e-6 leaves room for float32 output
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6 * want.abs().max().item())


def test_activation_layout_round_trips_and_pads_rows_to_the_conflict_free_stride() -> None:
    tool = _tool()
    x = torch.arange(50 * 96, dtype=torch.float32).reshape(50, 96)
    packed = tool.pack_activation(x)
    assert packed.numel() == 96 // 32 * 50 * 40
    chunk1 = packed.reshape(3, 50, 40)[1]
    assert torch.equal(chunk1[:, :32], x[:, 32:64]) and not chunk1[:, 32:].any()
    assert torch.equal(tool.unpack_activation(packed, 50, 64), x[:, :64])


def test_reference_chain_feeds_each_gemm_the_first_k_columns_rounded_to_bf16() -> None:
    tool = _tool()
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 512), (256, 256), (128, 256)]  # (K, N): each K at most the N before it
    weights = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for k, n in shapes]
    x = torch.randn(5, 64, generator=gen)
    y = x
    for w in weights:
        y = y[:, : w.shape[1]].to(torch.bfloat16).float() @ w.float().t()
    assert torch.equal(tool.reference_chain(weights, x), y)
    assert tool.expert_gemms(1) == [(1024, 2560), (2048, 1024), (1024, 8192), (4096, 1024)]
    assert len(tool.expert_gemms()) == 72


@pytest.mark.skipif(_tool().find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
def test_the_gemm_chain_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    library = _tool().build(tmp_path)
    assert library.gemm_chain_launch.restype is ctypes.c_int


@pytest.mark.parametrize(("m", "k", "n", "clusters", "split"),
                         [(50, 256, 256, 3, 4), (50, 128, 512, 4, 2), (64, 512, 64, 2, 4), (3, 96, 40, 5, 2)])
def test_cluster_packing_and_kernel_indexing_compose_into_the_gemm(m: int, k: int, n: int, clusters: int,
                                                                    split: int) -> None:
    """The cluster kernel (K split over 2 or 4 CTAs, partial sums met across the cluster): clusters of 10-11, 16,
    4 and 1 n8 tiles (odd counts leave the second half-warp group one tile fewer; one tile leaves it none), K
    shares of 1-4 chunks, M = 50, 64 and 3."""
    tool = _tool()
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    packed_x = tool.pack_activation_bf16(x)
    got = tool.emulate_cluster_gemm(tool.pack_weight_k_major(w).numpy(), packed_x.view(torch.int16).numpy(), m, k,
                                    n, clusters, split)
    want = (x.to(torch.bfloat16).double() @ w.double().t()).numpy()
    # the kernel rounds its output to bf16: half an ulp, 2^-9 of each element, beside float64's summation order
    np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-6 * np.abs(want).max())


@pytest.mark.skipif(_tool().find_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")
def test_the_cluster_gemm_chain_kernel_compiles_for_hopper(tmp_path: Path) -> None:
    library = _tool().build_cluster(tmp_path)
    assert library.gemm_chain_cluster_launch.restype is ctypes.c_int
    assert library.gemm_chain_cluster_ctas.restype is ctypes.c_int

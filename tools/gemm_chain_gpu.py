"""A denoise step's 72 expert GEMMs at batch 1 in one persistent CUDA kernel, with the arithmetic
(tools/stream_floor/gemm_chain.cu): tensor-core mma, the K split across CTAs (stream-K) and its atomic reduction, a
grid-wide wait between consecutive GEMMs. The GEMM half of issue 12's megakernel, measured before anyone builds
the rest (attention, norms, RoPE, GeGLU in the same kernel): if its GEMMs alone cost about what the six-kernel step
costs whole, the megakernel has nothing to win at batch 1.

    PYTHONPATH=. python3 tools/gemm_chain_gpu.py [--iters 50] [--json OUT.json] [--variants 64,64f] [--no-cluster]

Checks the kernel against torch first (one GEMM: float32 accumulation, 1e-5 of the output's scale; one layer and
the whole chain: each A rounded to bf16 as the kernel does, so only the summation order differs, 1e-3), then times
per step (p50 of --iters launches): the kernel with its ring shapes, the same kernel without the atomics and
without any math (streaming the same bytes), and cuBLAS's chain of the same 72 GEMMs (torch.mm, bf16, replayed
from a CUDA graph) in the same run. Each launch includes a 2 MB memset of the first output buffer (~2 us).
"""

from __future__ import annotations

import ctypes
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_floor_gpu import find_nvcc, time_ms  # noqa: E402

from pi05_ros.engine.config import PRESETS  # noqa: E402
from pi05_ros.engine.fast.pipeline import _Graph  # noqa: E402  (a CUDA graph warmed up on a side stream)

SOURCE = Path(__file__).resolve().parent / "stream_floor" / "gemm_chain.cu"
UNIT_BYTES, CHUNK, ROW_STRIDE, MAX_ROWS = 16384, 32, 40, 64  # the kernel's kUnitBytes, kChunk, kRowStride, kRows
# the stream-K forms timed by default: a unit's columns (its K: 8192 / that), "f" with per-n-tile waits
DEFAULT_VARIANTS = ("256", "128", "64", "64f", "128f")
# weight stages (16 KiB) x A stages (8000 B per 32 of K at M = 50) per unit width, within 227 KiB of shared memory
RINGS = {256: ((8, 6), (12, 4), (4, 4)), 128: ((8, 4), (6, 6)), 64: ((6, 3), (4, 4))}
SHARED_LIMIT = 227 * 1024
CLUSTER_SOURCE = SOURCE.parent / "gemm_chain_cluster.cu"
# the cluster kernel (gemm_chain_cluster.cu): K split over a cluster of 2 or 4 CTAs, its rings (weight stages of
# 16 KiB x A stages of 32 KiB, beside 64 KiB of partial sums); a cluster owns at most 32 n8 tiles of a GEMM
CLUSTER_SPLITS = (2, 4)  # 4: on an H200 only 120 CTAs fit in clusters of 4, too few for gate_up's 1024 tiles
CLUSTER_RINGS = ((6, 2), (4, 3), (8, 1))
CLUSTER_MAX_TILES = 32
# a lane's 8 bf16 of one n8 tile in a 32-deep chunk: b0, b1 of the first k16 step, then of the second; b0 holds K
# rows 2q, 2q + 1 and b1 rows 2q + 8, 2q + 9 of the mma's B fragment (q: the lane's index within its quad)
LANE_K = np.array([[2 * q, 2 * q + 1, 2 * q + 8, 2 * q + 9, 16 + 2 * q, 17 + 2 * q, 24 + 2 * q, 25 + 2 * q]
                   for q in range(4)])


def expert_gemms(layers: int | None = None) -> list[tuple[int, int]]:
    """(K, N) of each expert GEMM of a denoise step, layer after layer: qkv, o, gate_up, down."""
    e = PRESETS["pi05"].expert
    per_layer = [(e.width, (e.num_heads + 2 * e.num_kv_heads) * e.head_dim), (e.num_heads * e.head_dim, e.width),
                 (e.width, 2 * e.mlp_dim), (e.mlp_dim, e.width)]
    return per_layer * (e.depth if layers is None else layers)


def chunk_k(tile_n: int) -> int:
    """A unit's K for a unit width: 16 KiB of bf16 weights."""
    return UNIT_BYTES // 2 // tile_n


def pack_weight(w: torch.Tensor, tile_n: int) -> torch.Tensor:
    """W [N, K] bf16 -> the kernel's units, n-tile major: [N / TN][K / KC][TN / 8 n8 tiles][KC / 32][32 lanes][8 bf16],
    each lane's 8 values the B fragments of two k16 steps (lane = 4 * column-in-tile + quad)."""
    n, k = w.shape
    kc = chunk_k(tile_n)
    assert n % tile_n == 0 and k % kc == 0, (n, k, tile_n)
    tiles = w.reshape(n // tile_n, tile_n // 8, 8, k // kc, kc // CHUNK, CHUNK).permute(0, 3, 1, 4, 2, 5)
    lane_k = torch.as_tensor(LANE_K, device=w.device)
    packed = tiles[..., lane_k]  # nt, kc, n8 tile, chunk, column, quad, 8
    return packed.reshape(-1, 32, 8).contiguous().view(torch.uint8).reshape(-1)


def pack_activation(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 -> the kernel's chunked layout [K/32][M][40] (rows padded with zeros past column 32)."""
    m, k = x.shape
    out = torch.zeros(k // CHUNK, m, ROW_STRIDE, dtype=torch.float32, device=x.device)
    out[:, :, :CHUNK] = x.reshape(m, k // CHUNK, CHUNK).permute(1, 0, 2)
    return out.reshape(-1)


def unpack_activation(buf: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The chunked layout's first n columns back to [M, N]."""
    chunks = buf[: n // CHUNK * m * ROW_STRIDE].reshape(n // CHUNK, m, ROW_STRIDE)[:, :, :CHUNK]
    return chunks.permute(1, 0, 2).reshape(m, n)


def pack_weight_k_major(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] bf16 -> the cluster kernel's layout, K-chunk major: [K/32][N/8][32 lanes][8 bf16] (a chunk's run of
    n8 tiles is one bulk copy), each lane's 8 values as pack_weight's."""
    n, k = w.shape
    assert n % 8 == 0 and k % CHUNK == 0, (n, k)
    tiles = w.reshape(n // 8, 8, k // CHUNK, CHUNK).permute(2, 0, 1, 3)  # chunk, n8 tile, column, k
    packed = tiles[..., torch.as_tensor(LANE_K, device=w.device)]  # chunk, n8 tile, column, quad, 8
    return packed.reshape(-1, 32, 8).contiguous().view(torch.uint8).reshape(-1)


def pack_activation_bf16(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> the cluster kernel's bf16 chunks [K/32][M][40] (80-byte rows, zeros past column 32)."""
    m, k = x.shape
    out = torch.zeros(k // CHUNK, m, ROW_STRIDE, dtype=torch.bfloat16, device=x.device)
    out[:, :, :CHUNK] = x.reshape(m, k // CHUNK, CHUNK).permute(1, 0, 2).to(torch.bfloat16)
    return out.reshape(-1)


def cluster_share(k: int, n: int, m: int, cluster: int, clusters: int, rank: int, split: int) -> tuple[int, ...]:
    """The kernel's share_of: a CTA's n8 tiles [t0, t1), its K chunks [c0, c1), chunks per stage."""
    tiles, chunks = n // 8, k // CHUNK
    t0, t1 = tiles * cluster // clusters, tiles * (cluster + 1) // clusters
    by_weights = 16384 // (512 * max(1, t1 - t0))
    by_act = 32768 // (m * ROW_STRIDE * 2)
    return t0, t1, chunks * rank // split, chunks * (rank + 1) // split, max(1, min(by_weights, by_act))


def emulate_cluster_gemm(packed_w: np.ndarray, a_chunks: np.ndarray, m: int, k: int, n: int, clusters: int,
                         split: int) -> np.ndarray:
    """The cluster kernel's GEMM in numpy, index for index as emulate_gemm: each CTA's tiles and K chunks, stage by
    stage; each consumer warp's half of the tiles; A's bf16 pairs as 32-bit words; the partial sums in each CTA's
    [tile][64][8] buffer; each rank's C-th of the tiles summed over the cluster and rounded to bf16."""
    words = packed_w.view(np.uint16).reshape(k // CHUNK, n // 8, 32, 8)
    weights = _bf16_to_float(words)
    act = _bf16_to_float(a_chunks.view(np.uint16).reshape(k // CHUNK, m, ROW_STRIDE))
    act = np.concatenate([act, np.zeros((k // CHUNK, MAX_ROWS - m, ROW_STRIDE), np.float32)], axis=1)
    lane = np.arange(32)
    grp, quad = lane >> 2, lane & 3
    y = np.zeros((m, n), np.float32)
    for cluster in range(clusters):
        partials = np.zeros((split, CLUSTER_MAX_TILES, MAX_ROWS, 8))
        for rank in range(split):
            t0, t1, c0, c1, per_stage = cluster_share(k, n, m, cluster, clusters, rank, split)
            tiles = t1 - t0
            for w in range(8):
                row0, half = (w & 3) * 16, w >> 2
                first = half * ((tiles + 1) // 2)
                mine = min((tiles + 1) // 2, tiles - first)
                acc = np.zeros((max(mine, 0), 32, 4))
                for c in range(c0, c1):  # a stage's chunks one after another, as the kernel's inner loop
                    slot = act[c]
                    lo, hi = slot[row0 + grp], slot[row0 + grp + 8]
                    for ks in range(2):
                        col = ks * 16 + 2 * quad
                        a_tile = np.zeros((16, 16))
                        for rows, dr, dk in ((lo, 0, 0), (hi, 8, 0), (lo, 0, 8), (hi, 8, 8)):
                            a_tile[grp + dr, 2 * quad + dk] = rows[lane, col + dk]
                            a_tile[grp + dr, 2 * quad + dk + 1] = rows[lane, col + dk + 1]
                        for j in range(max(mine, 0)):
                            b = weights[c, t0 + first + j][:, 4 * ks: 4 * ks + 4]
                            b_tile = np.zeros((16, 8))
                            b_tile[2 * quad, grp], b_tile[2 * quad + 1, grp] = b[:, 0], b[:, 1]
                            b_tile[2 * quad + 8, grp], b_tile[2 * quad + 9, grp] = b[:, 2], b[:, 3]
                            d = a_tile @ b_tile
                            acc[j, :, 0] += d[grp, 2 * quad]
                            acc[j, :, 1] += d[grp, 2 * quad + 1]
                            acc[j, :, 2] += d[grp + 8, 2 * quad]
                            acc[j, :, 3] += d[grp + 8, 2 * quad + 1]
                for j in range(max(mine, 0)):
                    partials[rank, first + j, row0 + grp, 2 * quad] = acc[j, :, 0]
                    partials[rank, first + j, row0 + grp, 2 * quad + 1] = acc[j, :, 1]
                    partials[rank, first + j, row0 + grp + 8, 2 * quad] = acc[j, :, 2]
                    partials[rank, first + j, row0 + grp + 8, 2 * quad + 1] = acc[j, :, 3]
        t0, t1 = cluster_share(k, n, m, cluster, clusters, 0, split)[:2]
        for rank in range(split):
            for tile in range(rank, t1 - t0, split):
                total = partials[:, tile, :m].sum(axis=0)  # [m, 8]
                y[:, (t0 + tile) * 8: (t0 + tile + 1) * 8] = _round_bf16(total.astype(np.float32))
    return y


def emulate_gemm(packed_w: np.ndarray, a_chunks: np.ndarray, m: int, k: int, n: int, ctas: int,
                 tile_n: int) -> np.ndarray:
    """What the kernel computes for one GEMM, in numpy, index for index: each CTA's unit range; each consumer warp's
    A fragments (bf16-rounded from the float32 chunks, rows past M zero) and B fragments, read where the kernel reads
    them; each m16n8k16 product assembled from the lanes' fragments by the PTX ISA's fragment layout and handed back
    to the lanes by its C layout; the flushes into Y. A CPU check that the host's packing and the kernel's indexing
    compose into the GEMM."""
    kc = chunk_k(tile_n)
    per_unit = kc // CHUNK
    weights = _bf16_to_float(packed_w.view(np.uint16).reshape(-1, tile_n // 8 * per_unit * 32, 8))  # unit, uint4, 8
    chunks = k // kc
    units = (n // tile_n) * chunks
    act = _round_bf16(a_chunks.reshape(k // CHUNK, m, ROW_STRIDE))
    act = np.concatenate([act, np.zeros((k // CHUNK, MAX_ROWS - m, ROW_STRIDE), np.float32)], axis=1)  # rows >= M: 0
    lane = np.arange(32)
    grp, quad = lane >> 2, lane & 3
    tiles = tile_n // 16  # n8 tiles per warp
    y = np.zeros((m, n), np.float64)
    for cta in range(ctas):
        u0, u1 = units * cta // ctas, units * (cta + 1) // ctas
        acc = np.zeros((8, tiles, 32, 4))  # consumer warp, n8 tile, lane, c0..c3
        for u in range(u0, u1):
            for w in range(8):
                row0, col0 = (w & 3) * 16, (w >> 2) * tile_n // 2
                for c in range(per_unit):
                    slot = act[(u % chunks) * per_unit + c]
                    lo, hi = slot[row0 + grp], slot[row0 + grp + 8]  # [lane, 40]
                    for ks in range(2):
                        col = ks * 16 + 2 * quad
                        frag = [np.stack([rows[lane, col + dk], rows[lane, col + dk + 1]], 1)
                                for rows, dk in ((lo, 0), (hi, 0), (lo, 8), (hi, 8))]  # a0..a3: [lane, 2]
                        a_tile = np.zeros((16, 16))
                        for reg, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                            a_tile[grp + dr, 2 * quad + dk] = frag[reg][:, 0]
                            a_tile[grp + dr, 2 * quad + dk + 1] = frag[reg][:, 1]
                        for j in range(tiles):
                            v = weights[u, ((col0 // 8 + j) * per_unit + c) * 32 + lane]  # [lane, 8]
                            b = v[:, 4 * ks: 4 * ks + 4]  # b0 (2 values), b1 (2)
                            b_tile = np.zeros((16, 8))
                            b_tile[2 * quad, grp], b_tile[2 * quad + 1, grp] = b[:, 0], b[:, 1]
                            b_tile[2 * quad + 8, grp], b_tile[2 * quad + 9, grp] = b[:, 2], b[:, 3]
                            d = a_tile @ b_tile
                            acc[w, j, :, 0] += d[grp, 2 * quad]
                            acc[w, j, :, 1] += d[grp, 2 * quad + 1]
                            acc[w, j, :, 2] += d[grp + 8, 2 * quad]
                            acc[w, j, :, 3] += d[grp + 8, 2 * quad + 1]
            if u % chunks == chunks - 1 or u + 1 == u1:
                tile_col = (u // chunks) * tile_n
                for w in range(8):
                    row0, col0 = (w & 3) * 16, (w >> 2) * tile_n // 2
                    for j in range(tiles):
                        col = tile_col + col0 + j * 8 + 2 * quad
                        for dr, (c0, c1) in ((0, (0, 1)), (8, (2, 3))):
                            rows = row0 + grp + dr
                            keep = rows < m
                            np.add.at(y, (rows[keep], col[keep]), acc[w, j, keep, c0])
                            np.add.at(y, (rows[keep], col[keep] + 1), acc[w, j, keep, c1])
                acc[:] = 0
    return y.astype(np.float32)


def _bf16_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


def reference_chain(weights: list[torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
    """The chain in float32, each A rounded to bf16 as the kernel rounds it."""
    y = x0
    for w in weights:
        k = w.shape[1]
        y = y[:, :k].to(torch.bfloat16).float() @ w.float().t()
    return y


def _nvcc(source: Path, lib: Path) -> ctypes.CDLL:
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (CUDA toolkit)")
    subprocess.run([nvcc, "-arch=sm_90a", "-O3", "-shared", "-Xcompiler", "-fPIC", "-o", str(lib), str(source)],
                   check=True)
    return ctypes.CDLL(str(lib))


def build(out_dir: Path) -> ctypes.CDLL:
    """The stream-K kernel (gemm_chain.cu) as a shared library with its launcher's argument types."""
    so = _nvcc(SOURCE, out_dir / "gemm_chain.so")
    so.gemm_chain_launch.restype = ctypes.c_int
    so.gemm_chain_launch.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                             ctypes.c_ulonglong, ctypes.c_int, ctypes.c_void_p,
                                                             ctypes.c_uint] + [ctypes.c_int] * 5 + \
        [ctypes.c_void_p] * 3
    return so


def build_cluster(out_dir: Path) -> ctypes.CDLL:
    """The cluster kernel (gemm_chain_cluster.cu) as a shared library with its launcher's argument types."""
    so = _nvcc(CLUSTER_SOURCE, out_dir / "gemm_chain_cluster.so")
    so.gemm_chain_cluster_launch.restype = ctypes.c_int
    so.gemm_chain_cluster_launch.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                                     ctypes.c_ulonglong, ctypes.c_int,
                                                                     ctypes.c_void_p, ctypes.c_uint] + \
        [ctypes.c_int] * 5 + [ctypes.c_void_p]
    so.gemm_chain_cluster_ctas.restype = ctypes.c_int
    so.gemm_chain_cluster_ctas.argtypes = [ctypes.c_int] * 3
    return so


class _PackedChain:
    """What both kernels' chains hold on the GPU: the packed weights one after another, each GEMM's K, N and byte
    offset, `buffers` output buffers of the chunk layout in `dtype`, the grid's counters, and the launch epoch."""

    def __init__(self, packed: list[torch.Tensor], weights: list[torch.Tensor], m: int, ctas: int, buffers: int,
                 dtype: torch.dtype) -> None:
        dev = weights[0].device
        self.m, self.ctas, self.gemms, self.buffers = m, ctas, len(weights), buffers
        self.weights = torch.cat(packed)
        self.offsets = torch.tensor(np.cumsum([0, *[p.numel() for p in packed[:-1]]]), dtype=torch.int64,
                                    device=dev)
        self.k = torch.tensor([w.shape[1] for w in weights], dtype=torch.int32, device=dev)
        self.n = torch.tensor([w.shape[0] for w in weights], dtype=torch.int32, device=dev)
        self.n_last = weights[-1].shape[0]
        self.y_elements = max(w.shape[0] for w in weights) // CHUNK * m * ROW_STRIDE  # one buffer's
        self.y = torch.zeros(buffers * self.y_elements, dtype=dtype, device=dev)
        self.counters = torch.zeros(self.gemms, dtype=torch.int32, device=dev)
        self.epoch = 0

    def output(self) -> torch.Tensor:
        """The last GEMM's output, [M, N] in float32."""
        last = (self.gemms - 1) % self.buffers
        return unpack_activation(self.y[last * self.y_elements:(last + 1) * self.y_elements], self.m,
                                 self.n_last).float()


class Chain(_PackedChain):
    """The stream-K kernel's chain: float32 outputs in three rotating buffers."""

    def __init__(self, so: ctypes.CDLL, weights: list[torch.Tensor], m: int, ctas: int, tile_n: int,
                 fine: bool = False) -> None:
        """fine: per-n-tile counters instead of a grid-wide wait between GEMMs (each GEMM needs >= ctas units)."""
        super().__init__([pack_weight(w, tile_n) for w in weights], weights, m, ctas, 3, torch.float32)
        self.so, self.tile_n = so, tile_n
        self.tile_counters = self.tile_base = None
        if fine:
            tiles = [w.shape[0] // tile_n for w in weights]
            assert all(t * (w.shape[1] // chunk_k(tile_n)) >= ctas for t, w in zip(tiles, weights, strict=True)), \
                "too few units"
            self.tile_counters = torch.zeros(sum(tiles), dtype=torch.int32, device=self.y.device)
            self.tile_base = torch.tensor(np.cumsum([0, *tiles[:-1]]), dtype=torch.int32, device=self.y.device)

    def launch(self, x0_packed: torch.Tensor, weight_stages: int, act_stages: int, compute: int = 1) -> None:
        self.epoch += 1
        fine = self.tile_counters is not None
        err = self.so.gemm_chain_launch(self.weights.data_ptr(), self.k.data_ptr(), self.n.data_ptr(),
                                        self.offsets.data_ptr(), self.gemms, x0_packed.data_ptr(), self.y.data_ptr(),
                                        self.y_elements, self.m, self.counters.data_ptr(), self.epoch, self.ctas,
                                        self.tile_n, weight_stages, act_stages, compute,
                                        self.tile_counters.data_ptr() if fine else None,
                                        self.tile_base.data_ptr() if fine else None,
                                        ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if err:
            raise SystemExit(f"launch failed: cudaError {err} (units {self.tile_n} wide, ring {weight_stages} x "
                             f"{act_stages}, compute {compute})")


class ClusterChain(_PackedChain):
    """The cluster kernel's chain: bf16 outputs in two buffers."""

    def __init__(self, so: ctypes.CDLL, weights: list[torch.Tensor], m: int, ctas: int, split: int) -> None:
        clusters = ctas // split
        for w in weights:
            assert -(-w.shape[0] // 8 // clusters) <= CLUSTER_MAX_TILES and w.shape[0] // 8 >= clusters, \
                (w.shape, clusters)
        super().__init__([pack_weight_k_major(w) for w in weights], weights, m, ctas, 2, torch.bfloat16)
        self.so, self.split = so, split

    def launch(self, x0_packed: torch.Tensor, weight_stages: int, act_stages: int, compute: int = 1) -> None:
        self.epoch += 1
        err = self.so.gemm_chain_cluster_launch(
            self.weights.data_ptr(), self.k.data_ptr(), self.n.data_ptr(), self.offsets.data_ptr(), self.gemms,
            x0_packed.data_ptr(), self.y.data_ptr(), self.y_elements, self.m, self.counters.data_ptr(), self.epoch,
            self.ctas, self.split, weight_stages, act_stages, compute,
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if err:
            raise SystemExit(f"cluster launch failed: cudaError {err} (split {self.split}, ring {weight_stages} x "
                             f"{act_stages}, compute {compute})")


def random_weights(gemms: list[tuple[int, int]], dev: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Weights ~ N(0, 1/K): each GEMM keeps its output at about the input's scale over the 72."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    return [(torch.randn(n, k, device=dev, generator=gen) / k ** 0.5).to(torch.bfloat16) for k, n in gemms]


def chain_tolerance(count: int, chain_length: int, cublas_err: float) -> float:
    """How far a chain of `count` GEMMs may land from the float32 reference. One GEMM differs only in summation
    order (~1e-7 of the scale): 1e-5. Over a chain, wherever two sums differ in their last float32 bits an A element
    can round to the neighbouring bf16 value (2^-8 of it), and the chain of random GEMMs carries and spreads those
    flips: cuBLAS's own chain lands 1.65e-2 from the reference after 72 (H200, §79). So: twice what cuBLAS's chain
    shows at the full length, and 5e-3 after a layer's 4 (measured 1.1e-3 for every kernel form)."""
    if count == 1:
        return 1e-5
    return 5e-3 if count < chain_length else max(2 * cublas_err, 5e-3)


def check_chain(make_chain, x0_packed: torch.Tensor, ring: tuple[int, int], tolerances: dict[int, float],
                weights: list[torch.Tensor], x0: torch.Tensor, label: str, facts: dict, result: dict) -> bool:
    """One launch of `make_chain(count)` for each count of GEMMs in `tolerances`, its output against the float32
    reference; each check printed and recorded with `facts`. True when all are within their tolerance."""
    right = True
    for count, tol in tolerances.items():
        chain = make_chain(count)
        chain.launch(x0_packed, *ring)
        torch.cuda.synchronize()
        want = reference_chain(weights[:count], x0)
        err = (chain.output() - want).abs().max().item() / want.abs().max().item()
        ok = err <= tol
        right &= ok
        print(f"check, {label}, {count} GEMM(s): max |err| / max |y| = {err:.2e} (tolerance {tol:g}) "
              f"{'ok' if ok else 'WRONG'}", flush=True)
        result["checks"].append({**facts, "gemms": count, "rel_err": err, "tolerance": tol, "ok": ok})
    return right


def time_row(fn, iters: int, form: str, what: str, ring: tuple[int, int] | None, total: int, facts: dict,
             result: dict) -> None:
    """Times `fn` (one step), prints the table row and records it with `facts`."""
    p50, p99 = time_ms(fn, iters)
    rings = f"{ring[0]} x {ring[1]}" if ring else "-"
    print(f"| {form} | {what} | {rings} | {p50:.3f} ms | {p99:.3f} ms | {total / p50 / 1e9:.2f} |", flush=True)
    result["runs"].append({**facts, "what": what, "ring": list(ring) if ring else None, "p50_ms": p50,
                           "p99_ms": p99})


def main() -> int:
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 50
    json_out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    variants = (sys.argv[sys.argv.index("--variants") + 1].split(",") if "--variants" in sys.argv
                else list(DEFAULT_VARIANTS))
    cluster = "--no-cluster" not in sys.argv
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms, m = props.multi_processor_count, 50
    gemms = expert_gemms()
    weights = random_weights(gemms, dev)
    total = sum(w.numel() * 2 for w in weights)
    print(f"{props.name}, {sms} SMs, torch {torch.__version__}; {len(gemms)} GEMMs at M = {m}, "
          f"{total / 1e9:.3f} GB of bf16 weights a step", flush=True)
    gen = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.randn(m, gemms[0][0], device=dev, generator=gen).to(torch.bfloat16).float()
    x0_packed = pack_activation(x0)
    result: dict = {"device": props.name, "sms": sms, "m": m, "gemms": len(gemms), "bytes": total, "checks": [],
                    "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        so = build(Path(tmp))
        print("| kernel | what | ring (weights x A) | step p50 | p99 | weights TB/s |", flush=True)
        print("|---|---|---|---|---|---|", flush=True)
        # cuBLAS's chain of the same GEMMs, bf16 in and out, from a CUDA graph
        a0 = x0.to(torch.bfloat16)
        static_out: list[torch.Tensor] = []

        def torch_chain() -> None:
            y = a0
            for w in weights:
                y = torch.mm(y[:, : w.shape[1]], w.t())
            static_out[:] = [y]

        time_row(_Graph(torch_chain, None).replay, iters, "-", "cuBLAS chain (torch.mm bf16, CUDA graph of 72)",
                 None, total, {}, result)
        want = reference_chain(weights, x0)
        cublas_err = (static_out[0].float() - want).abs().max().item() / want.abs().max().item()
        print(f"(cuBLAS chain against the same reference: {cublas_err:.2e}; its A is bf16 out of each GEMM)",
              flush=True)
        result["cublas_rel_err"] = cublas_err
        modes = {1: "mma + stream-K atomics", 2: "mma without the atomics (no result)",
                 0: "no math (streaming only)"}
        layer, whole = 4, len(gemms)
        for variant in variants:
            tile_n, fine = int(variant.rstrip("f")), variant.endswith("f")
            form = f"stream-K, units {tile_n} x {chunk_k(tile_n)}" + (", per-tile waits" if fine else "")
            facts = {"tile_n": tile_n, "fine": fine}
            tolerances = {count: chain_tolerance(count, whole, cublas_err) for count in (1, layer, whole)}
            # correctness first, with the width's first ring: 1 GEMM, 1 layer, the whole chain
            if not check_chain(lambda count, tile_n=tile_n, fine=fine: Chain(so, weights[:count], m, sms, tile_n,
                                                                             fine=fine and count > 1),
                               x0_packed, RINGS[tile_n][0], tolerances, weights, x0, form, facts, result):
                continue
            chain = Chain(so, weights, m, sms, tile_n, fine=fine)
            for compute, what in modes.items():
                for ring in RINGS[tile_n] if compute == 1 else RINGS[tile_n][:1]:
                    time_row(functools.partial(chain.launch, x0_packed, *ring, compute=compute), iters, form, what,
                             ring, total, facts, result)
            # and the result of a launch after the timed ones (a race that shows only when launches follow
            # each other would show here)
            check_chain(lambda count, chain=chain: chain, x0_packed, RINGS[tile_n][0], {whole: tolerances[whole]},
                        weights, x0, f"{form}, after the timed launches", {**facts, "after_timing": True}, result)
            if json_out:
                Path(json_out).write_text(json.dumps(result, indent=1))
        # the cluster kernel: K split inside a cluster, partial sums met in distributed shared memory, bf16 out
        cso = build_cluster(Path(tmp))
        x0_bf16 = pack_activation_bf16(x0)
        for split in CLUSTER_SPLITS if cluster else ():
            for ring in CLUSTER_RINGS:
                resident = cso.gemm_chain_cluster_ctas(split, *ring)
                ctas = min(resident, sms) // split * split
                clusters = ctas // split
                if resident <= 0 or any(-(-n // 8 // clusters) > CLUSTER_MAX_TILES for _, n in gemms):
                    print(f"cluster {split}, ring {ring}: {resident} CTAs resident, too few for the widest GEMM "
                          f"(skipped)", flush=True)
                    continue
                form = f"K / {split} in a cluster, {ctas} CTAs"
                facts = {"cluster": split, "ctas": ctas}
                # the output is rounded to bf16 (half an ulp: 2^-9 of an element), besides the summation order
                tolerances = {1: 4e-3, layer: chain_tolerance(layer, whole, cublas_err),
                              whole: chain_tolerance(whole, whole, cublas_err)}
                if not check_chain(lambda count, split=split, ctas=ctas: ClusterChain(cso, weights[:count], m, ctas,
                                                                                      split),
                                   x0_bf16, ring, tolerances, weights, x0, f"{form}, ring {ring}", facts, result):
                    continue
                chain = ClusterChain(cso, weights, m, ctas, split)
                for compute, what in ((1, "cluster K split, DSMEM reduction, bf16 out"),
                                      (0, "cluster kernel, no math (streaming only)")):
                    time_row(functools.partial(chain.launch, x0_bf16, *ring, compute=compute), iters, form, what,
                             ring, total, facts, result)
                if json_out:
                    Path(json_out).write_text(json.dumps(result, indent=1))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return 0 if all(check["ok"] for check in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())

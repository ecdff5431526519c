"""The floor of a persistent "megakernel" denoise step on this GPU: one kernel streaming a step's expert weights
(the 72 GEMMs of 18 layers, 0.62 GB in bf16) through shared memory, without and with a grid-wide dependency between
consecutive GEMMs, its copies running ahead across it or held until it passes, and with every CTA reading each GEMM's
A operand from L2 (whole, or a K split's quarter), by its threads' loads or by bulk copies beside the weights'
(tools/stream_floor/stream_floor.cu).
No math: what streaming alone costs, against the six kernels' 0.84 ms per step (H100, docs/benchmarks.md §60).

    PYTHONPATH=. python3 tools/stream_floor_gpu.py [--iters 20]

Builds the kernel with nvcc (sm_90a: Hopper's bulk copies and mbarriers) and calls it through ctypes. Checks that
every byte arrived (an XOR checksum against numpy's), then prints one line per (mode, ring) with the p50 time per
step and the bandwidth; a device-to-device copy of the same bytes gives the card's streaming scale.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pi05_ros.engine.config import PRESETS  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "stream_floor" / "stream_floor.cu"
# mode: (grid-wide wait after each GEMM, copies held at it, activations each CTA reads per GEMM: 0 none, 1 the whole
# A operand, 4 a quarter of it, as with K split in 4; A's rows: 64, batch 1's 50 padded, or 400, a batch of 8;
# A read by bulk copies into a ring of its own (64 KiB) instead of the consumer threads' loads)
MODES = {"stream": (0, 0, 0, 64, 0), "sync, copies run ahead": (1, 0, 0, 64, 0), "sync, copies held": (1, 1, 0, 64, 0),
         "sync, run ahead, + whole A per GEMM": (1, 0, 1, 64, 0), "sync, run ahead, + A / 4 per GEMM": (1, 0, 4, 64, 0),
         "batch 8: sync, run ahead, + A / 4 (400 rows)": (1, 0, 4, 400, 0),
         "sync, run ahead, + whole A, bulk copies": (1, 0, 1, 64, 1),
         "sync, run ahead, + A / 4, bulk copies": (1, 0, 4, 64, 1),
         "batch 8: sync, run ahead, + A / 4 (400 rows), bulk copies": (1, 0, 4, 400, 1)}
RINGS = ((8, 16384), (12, 16384), (4, 32768), (6, 32768), (16, 8192))  # stages x bytes per stage
ACT_RING_BYTES = 4 * 16384  # kActStages x kActStageBytes in the kernel
SHARED_LIMIT = 227 * 1024  # the H100's and H200's shared memory per CTA: rings beyond it are left out
CONSUMER_WARPS = 4  # beside the two producer warps (weights, and A's bulk copies)


def find_nvcc() -> str | None:
    """nvcc on PATH, or in a CUDA toolkit under /usr/local (the GPU machine's)."""
    return shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


def build(out_dir: Path) -> ctypes.CDLL:
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (CUDA toolkit)")
    lib = out_dir / "stream_floor.so"
    subprocess.run([nvcc, "-arch=sm_90a", "-O3", "-shared", "-Xcompiler", "-fPIC", "-o", str(lib), str(SOURCE)],
                   check=True)
    so = ctypes.CDLL(str(lib))
    so.stream_floor_launch.restype = ctypes.c_int
    so.stream_floor_launch.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint,
                                                                ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                                ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                                ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                                ctypes.c_void_p]
    return so


def time_ms(fn, iters: int) -> tuple[float, float]:
    """p50 and p99 ms of `fn` over `iters` calls after 3 unrecorded ones, each queued behind a GPU sleep so the
    time is the GPU's work, not the host's launch latency."""
    times = []
    for _ in range(iters + 3):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    t = np.array(times[3:])
    return float(np.median(t)), float(np.percentile(t, 99))


def activation_bytes(rows: int = 64) -> list[int]:
    """Each GEMM's A operand in bf16 (its rows padded to the kernels' 64), in segment_bytes' order."""
    e = PRESETS["pi05"].expert
    per_layer = [e.width, e.num_heads * e.head_dim, e.width, e.mlp_dim]  # K of qkv, o, gate_up, down
    return [2 * rows * k for _ in range(e.depth) for k in per_layer]


def segment_bytes() -> list[int]:
    """Each GEMM's bf16 weight bytes, layer after layer, in the six kernels' order."""
    e = PRESETS["pi05"].expert
    per_layer = [e.width * (e.num_heads + 2 * e.num_kv_heads) * e.head_dim, e.num_heads * e.head_dim * e.width,
                 e.width * 2 * e.mlp_dim, e.mlp_dim * e.width]
    return [2 * n for _ in range(e.depth) for n in per_layer]


def main() -> int:
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 20
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    sizes = segment_bytes()
    total = sum(sizes)
    print(f"{props.name}, {sms} SMs, torch {torch.__version__}; {len(sizes)} GEMMs, {total / 1e9:.3f} GB a step",
          flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = torch.randint(0, 256, (total,), dtype=torch.uint8, device=dev, generator=gen)
    offsets = torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.int64, device=dev)
    seg_size = torch.tensor(sizes, dtype=torch.int64, device=dev)
    words = weights.view(torch.int32).view(-1, 4).cpu().numpy()
    want = int(np.bitwise_xor.reduce(words[:, 0] ^ words[:, 1] ^ words[:, 2] ^ words[:, 3])) & 0xFFFFFFFF
    stream = torch.cuda.current_stream(dev)
    act = torch.randint(0, 256, (max(activation_bytes(400)),), dtype=torch.uint8, device=dev, generator=gen)
    sink = torch.zeros(sms, dtype=torch.int32, device=dev)

    copy = torch.empty_like(weights)
    ms, _ = time_ms(functools.partial(copy.copy_, weights), iters)
    print(f"device copy of the step's bytes (read + write): {ms:.3f} ms, {2 * total / ms / 1e9:.2f} TB/s", flush=True)
    del copy

    with tempfile.TemporaryDirectory() as tmp:
        so = build(Path(tmp))
        print("| mode | ring | consumer warps | checksum | step p50 | p99 | read TB/s |", flush=True)
        print("|---|---|---|---|---|---|---|", flush=True)
        for mode, (sync, hold, a_split, rows, act_async) in MODES.items():
            act_bytes = (torch.tensor([n // a_split // 16 * 16 for n in activation_bytes(rows)], dtype=torch.int64,
                                      device=dev) if a_split else None)
            for stages, stage_bytes in RINGS:
                if act_async and stages * stage_bytes + ACT_RING_BYTES + 1024 > SHARED_LIMIT:
                    continue  # the two rings and the barriers would not fit
                counters = torch.zeros(len(sizes), dtype=torch.int32, device=dev)
                checksum = torch.zeros(sms, dtype=torch.int32, device=dev)
                times = []
                wrong = 0
                for epoch in range(1, iters + 5):
                    checksum.zero_()
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    # the GPU busy while the start event and the launch are queued: the time is the kernel's,
                    # not the host's launch latency
                    torch.cuda._sleep(200_000)
                    start.record()
                    err = so.stream_floor_launch(weights.data_ptr(), offsets.data_ptr(), seg_size.data_ptr(),
                                                 len(sizes), counters.data_ptr(), epoch, sms, CONSUMER_WARPS,
                                                 stages, stage_bytes, sync, hold, checksum.data_ptr(),
                                                 act.data_ptr(), None if act_bytes is None else
                                                 act_bytes.data_ptr(), sink.data_ptr(), act_async, a_split or 1,
                                                 ctypes.c_void_p(stream.cuda_stream))
                    stop.record()
                    if err:
                        raise SystemExit(f"launch failed: cudaError {err} ({mode}, {stages} x {stage_bytes})")
                    stop.synchronize()
                    times.append(start.elapsed_time(stop))
                    got = int(np.bitwise_xor.reduce(checksum.cpu().numpy())) & 0xFFFFFFFF  # every byte, once
                    wrong += got != want
                ok = "ok" if not wrong else f"WRONG in {wrong} of {iters + 4} launches"
                t = np.array(times[4:])
                p50, p99 = float(np.median(t)), float(np.percentile(t, 99))
                print(f"| {mode} | {stages} x {stage_bytes // 1024} KiB | {CONSUMER_WARPS} | {ok} | "
                      f"{p50:.3f} ms | {p99:.3f} ms | {total / p50 / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

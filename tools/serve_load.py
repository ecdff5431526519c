"""Load on a running policy server (pi05-serve or its Ray deployment): N robots in closed loop, each sending its
next observation as soon as its reply is in, over loopback or a network. Reports throughput and latency per
number of clients, and how the server batched them.

    pi05-serve --demo --device cpu --threads 1 --port 8000 &                       # or a real checkpoint, a GPU
    PYTHONPATH=. python3 tools/serve_load.py --url ws://127.0.0.1:8000 --clients 1 2 4 8 --requests 40

Observations use the server's own layout (/pi05_ros): `--views` random 224x224 images, a random state of the
model's size, a 6-word prompt, a noise seed per request. Latency is the client's: send to reply. Each robot is a
process of its own, as robots are machines of their own (threads of one process would queue on its interpreter
lock: 8 robots' 300 KB frames encoded and decoded one after another).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.sync.client import connect

from pi05_ros.engine.timing import summarize
from pi05_ros.serve.wire import pack, unpack


def observation(meta: dict, rng: np.random.Generator, views: int, size: int, num_steps: int, seed: int) -> bytes:
    images = {slot: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for slot in meta["image_keys"][:views]}
    return pack({"images": images, "state": rng.uniform(-1, 1, meta["state_dim"]).astype(np.float32),
                 "prompt": "pick up the cup and place it", "num_steps": num_steps, "noise_seed": seed})


# A request's time inside the server, as its reply's server_timing gives it (ms): see serve/service.py.
SERVER_PARTS = ("infer_ms", "prepare_ms", "queue_ms", "run_ms", "wake_ms")


def robot(url: str, index: int, requests: int, warmup: int, views: int, size: int, num_steps: int,
          barrier, results) -> None:
    """One robot in closed loop, in a process of its own (as a fleet's robots are: no interpreter lock shared
    with the others); puts (records, error) on `results`."""
    rng = np.random.default_rng(index)
    records = []
    try:
        with connect(url, compression=None, max_size=None, open_timeout=60) as ws:
            meta = unpack(ws.recv(timeout=60))
            frames = [observation(meta, rng, views, size, num_steps, index * 10_000 + i)
                      for i in range(warmup + requests)]
            for frame in frames[:warmup]:
                ws.send(frame)
                ws.recv(timeout=600)
            barrier.wait()
            for frame in frames[warmup:]:
                start = time.perf_counter()
                ws.send(frame)
                reply = ws.recv(timeout=600)
                elapsed = (time.perf_counter() - start) * 1e3
                if isinstance(reply, str):
                    raise RuntimeError(reply)
                server = unpack(reply)["server_timing"]
                records.append({"latency": elapsed, "batch_size": server["batch_size"],
                                **{part: server.get(part, float("nan")) for part in SERVER_PARTS}})
        results.put((records, None))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        results.put(([], f"client {index}: {type(exc).__name__}: {exc}"))


def run_clients(url: str, clients: int, requests: int, warmup: int, views: int, size: int,
                num_steps: int) -> dict:
    """`clients` robots at once, each a process, timed from the moment every one has warmed up."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=robot, args=(url, i, requests, warmup, views, size, num_steps, barrier, results))
             for i in range(clients)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=600)  # every client warmed up and ready
    except threading.BrokenBarrierError:
        pass  # a client failed: its error is reported below
    start = time.perf_counter()
    records, errors = [], []
    for _ in procs:
        rows, error = results.get(timeout=1800)
        records += rows
        if error:
            errors.append(error)
    wall = time.perf_counter() - start
    for proc in procs:
        proc.join(30)
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    latencies = [r["latency"] for r in records]
    batch_sizes = Counter(r["batch_size"] for r in records)
    stats = summarize(latencies)

    def median(key: str) -> float:
        return float(np.median([r[key] for r in records]))

    return {"clients": clients, "requests": len(latencies), "throughput_per_s": len(latencies) / wall,
            "p50_ms": stats["p50"], "p99_ms": stats["p99"], "mean_ms": stats["mean"],
            "mean_batch": sum(k * v for k, v in batch_sizes.items()) / max(1, sum(batch_sizes.values())),
            "batch_sizes": dict(sorted(batch_sizes.items())),
            # medians of where a request's time goes; outside = client latency - server time: the wire, the
            # client's encoding and decoding, the server's receiving and sending
            "server_p50_ms": median("infer_ms"), "prepare_p50_ms": median("prepare_ms"),
            "queue_p50_ms": median("queue_ms"), "run_p50_ms": median("run_ms"), "wake_p50_ms": median("wake_ms"),
            # the server's time its parts leave out (handing the row to the batcher and the batch to its thread)
            "unaccounted_p50_ms": float(np.median([r["infer_ms"] - sum(r[k] for k in SERVER_PARTS[1:])
                                                   for r in records])),
            "outside_p50_ms": float(np.median([r["latency"] - r["infer_ms"] for r in records]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=40, help="timed requests per client")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per client first")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    url = urlunsplit((parts.scheme, parts.netloc, (parts.path.rstrip("/") or "") + "/pi05_ros", "", ""))
    rows = []
    print("| clients | obs/s | p50 ms | p99 ms | mean batch | batch sizes (size: replies) |")
    print("|---|---|---|---|---|---|")
    for clients in args.clients:
        row = run_clients(url, clients, args.requests, args.warmup, args.views, args.image_size, args.num_steps)
        rows.append(row)
        print(f"| {clients} | {row['throughput_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{row['mean_batch']:.2f} | {row['batch_sizes']} |", flush=True)
    print("\nwhere the time goes (medians, ms): the server's receive -> reply ready, of which receive -> submitted"
          " (decode, check, preprocess), queued for the batch, the batch's run, and batch done -> reply ready; then"
          " the rest of the client's latency (wire, encoding and decoding on both sides)")
    print("| clients | server | prepare | queued | batch run | wake | outside the server |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['server_p50_ms']:.1f} | {row['prepare_p50_ms']:.1f} | "
              f"{row['queue_p50_ms']:.1f} | {row['run_p50_ms']:.1f} | {row['wake_p50_ms']:.1f} | "
              f"{row['outside_p50_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

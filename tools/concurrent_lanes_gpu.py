"""Batches at once on one GPU: does a second pipeline on its own CUDA stream fill what a batch leaves idle?

    PYTHONPATH=. python3 tools/concurrent_lanes_gpu.py [--configs 1x8,2x4,2x4p] [--iters 40] [--steps 10]

Why (issue 9): at batch 8 the denoise loop is a chain of ~110 small dependent kernels per step (docs/benchmarks.md
§43, §48): the GPU waits on launches more than it computes, while the prefill's GEMMs are compute-bound. "Lanes"
(each its own Pi05Pipeline, buffers and CUDA graphs, on its own stream, driven by its own thread) let one batch's
prefill run beside another's denoise. If two lanes of 4 beat one batch of 8 on latency at the same throughput,
the server should run lanes. Measured twice, they do not (docs/benchmarks.md §48, §86: on an H100 two lanes of 4
took 45.3 ms a call against 41.4 for one batch of 8, with the denoise at high priority or not).

A config `LxB` runs L lanes of B rows a call, all at once, in closed loop (each call starts when the previous one
of its lane returned); `LxBp` also runs each lane's denoise loop on a stream of higher priority than its vision and
prefill, so the GPU hands a freed SM to the waiting small kernel before the next tile of another lane's big GEMM.
§48 ran `2x4` on torch's shared capture stream (every graph one cuBLAS workspace): actions differed and nothing
was gained; each pipeline now captures on a stream of its own. The tool reports each call's latency (p50 / p99)
and the rows per second of all lanes together, and checks that every lane's actions under concurrency equal, bit
for bit, what its pipeline gives for the same rows alone. Full-size random weights, fp8, 2 views, distinct images
and noise per row; lanes share one model's weights (Pi05Pipeline.lane(), what
pi05-serve --lanes runs) unless --copies gives each its own. JSON to $OUT/lanes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import torch

from pi05_ros.engine.fast.pipeline import Pi05Pipeline
from pi05_ros.engine.policy import Policy


def observations(policy: Policy, rows: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    size = policy.config.vision.image_size
    out = []
    for _ in range(rows):
        images = {key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for key in policy.image_keys[:2]}
        state = rng.uniform(-1, 1, policy.state_dim).astype(np.float32)
        noise = rng.standard_normal((policy.config.action_horizon, policy.config.action_dim)).astype(np.float32)
        out.append(policy.prepare(images, state, "pick up the cup and place it", noise=noise))
    return out


def demo_policy(device: str, precision: str, max_batch: int) -> Policy:
    policy = Policy.demo(device=device, precision=precision, max_batch=max_batch)
    if device == "cpu":  # the fast pipeline without graphs: checks this tool's lanes on the tiny model
        policy = policy.with_runner(Pi05Pipeline(policy.model, "bf16", use_graphs=False, compile=False,
                                                 expert_kernels="off", max_batch=max_batch))
    return policy


def closed_loop(runner, rows: list, steps: int, iters: int, start: threading.Barrier,
                latencies: list, results: list) -> None:
    runner.run_batch(rows, steps)  # this lane's streams warm
    start.wait()
    for _ in range(iters):
        begin = time.perf_counter()
        actions, _ = runner.run_batch(rows, steps)
        latencies.append((time.perf_counter() - begin) * 1e3)
        results.append(actions)


def run(lanes: list, rows: list[list], steps: int, iters: int, priority: bool) -> dict:
    for lane in lanes:  # every lane (the first too) on a stream of its own, its denoise loop maybe on a second
        lane.use_own_streams(denoise_priority=priority)
    start = threading.Barrier(len(lanes) + 1)
    latencies = [[] for _ in lanes]
    results = [[] for _ in lanes]
    threads = [threading.Thread(target=closed_loop, args=(lane, r, steps, iters, start, lat, res))
               for lane, r, lat, res in zip(lanes, rows, latencies, results, strict=True)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    for lane in lanes:
        lane.stream = lane.denoise_stream = None
    every = np.concatenate([np.asarray(lat) for lat in latencies])
    return {"lanes": len(lanes), "batch": len(rows[0]), "priority": priority, "p50_ms": float(np.median(every)),
            "p99_ms": float(np.percentile(every, 99)), "rows_per_s": len(lanes) * len(rows[0]) * iters / elapsed,
            "actions": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x8,2x4,2x4p",
                        help="LxB: L lanes of B rows at once; a trailing p puts each lane's denoise on a "
                             "high-priority stream")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", action="store_true",
                        help="each lane a Policy of its own (weights copied, as §48) instead of Pi05Pipeline.lane()")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu checks the tool on the tiny model")
    args = parser.parse_args()
    configs = []
    for text in args.configs.split(","):
        lanes, batch = text.rstrip("p").split("x")
        configs.append((int(lanes), int(batch), text.endswith("p")))
    max_lanes = max(c[0] for c in configs)
    max_batch = max(c[1] for c in configs)
    precision = "fp8" if args.device == "cuda" else "auto"
    begin = time.perf_counter()
    policies = [demo_policy(args.device, precision, max_batch) for _ in range(max_lanes if args.copies else 1)]
    runners = [policy.runner for policy in policies]
    runners += [runners[0].lane() for _ in range(max_lanes - len(runners))]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    memory = torch.cuda.memory_allocated() / 1e9 if args.device == "cuda" else 0.0
    print(f"{name}, {max_lanes} lanes built ({type(runners[0]).__name__}) in {time.perf_counter() - begin:.0f} s, "
          f"GPU memory allocated {memory:.1f} GB", flush=True)
    report = []
    rows = {}  # (lane, batch) -> the rows, and what the lane gives for them alone
    for lanes, batch, priority in configs:
        for lane in range(lanes):
            if (lane, batch) not in rows:
                lane_rows = observations(policies[0], batch, seed=100 * lane + batch)
                for _ in range(3):  # capture this bucket's graphs before any concurrency, and warm
                    actions, _ = runners[lane].run_batch(lane_rows, args.steps)
                rows[(lane, batch)] = (lane_rows, actions)
        result = run(runners[:lanes], [rows[(lane, batch)][0] for lane in range(lanes)], args.steps, args.iters,
                     priority)
        alone = [rows[(lane, batch)][1] for lane in range(lanes)]
        result["equal_to_alone"] = all(np.array_equal(got, want)  # every call of every lane
                                       for calls, want in zip(result.pop("actions"), alone, strict=True)
                                       for got in calls)
        print(json.dumps(result), flush=True)
        report.append(result)
    print("\n| lanes | rows a call | denoise stream | robots | call p50 ms | p99 ms | rows/s | equal to alone |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report:
        stream = "high priority" if r["priority"] else "the lane's"
        print(f"| {r['lanes']} | {r['batch']} | {stream} | {r['lanes'] * r['batch']} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['rows_per_s']:.1f} | {r['equal_to_alone']} |")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "lanes.json"), "w") as f:
        json.dump({"steps": args.steps, "device": name, "rows": report}, f, indent=1)


if __name__ == "__main__":
    main()

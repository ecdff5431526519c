#!/usr/bin/env python3
"""How a stopped policy node leaves the ROS graph, over many trials (issue 11 item 2).

    source scripts/env.sh && python tools/graph_leave_trials.py [--trials 30] [--signal INT,TERM] [--idle]

Each trial starts the installed policy_node (CPU demo model, inputs flowing from a peer so it infers), waits for
chunks, sends the signal and measures: seconds until the peer's graph no longer lists the node, seconds from the
signal to the node's last line, the exit code, and the Fast DDS files in /dev/shm the node used that remain with
no other user. `--signal KILL` shows the contrast (the DDS lease, ~20 s; segments the process could not remove).
`--idle` runs the node with autostart:=false (no model, no inference) to separate the two.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "ros"))

from ros_harness import (  # noqa: E402
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    stop_and_watch_graph,
    unique_namespace,
)


def trial(sig: int, idle: bool, watch_s: float) -> dict:
    namespace = unique_namespace("pi05_leave")
    driver = Driver(namespace)
    driver.say("stack the blocks")
    node = NodeProcess("policy_node", namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "warmup:=0", "-p", "cpu_threads:=1", *(("-p", "autostart:=false") if idle else ()),
                       params_file=installed_params_file())
    try:
        if idle:
            ready = driver.wait_for_status(0.0, NODE_START_TIMEOUT_S, lambda s: "unconfigured" in s.message)
        else:
            ready = driver.wait_for_chunks(2, 0.0, NODE_START_TIMEOUT_S)
        if not ready or not driver.sees_node():
            raise RuntimeError(f"the node did not come up:\n{node.output()[-2000:]}")
        return stop_and_watch_graph(node, driver, sig, watch_s)
    finally:
        node.stop()
        driver.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--signal", default="INT,TERM", help="comma-separated, used in turn: INT, TERM, KILL")
    parser.add_argument("--idle", action="store_true", help="autostart:=false: no model, no inference")
    parser.add_argument("--watch", type=float, default=30.0, help="seconds to watch the graph after the signal")
    args = parser.parse_args()
    signals = [getattr(signal, f"SIG{name.strip().upper()}") for name in args.signal.split(",")]
    results = []
    for i in range(args.trials):
        sig = signals[i % len(signals)]
        result = trial(sig, args.idle, args.watch)
        results.append((sig, result))
        gone = "still seen" if result["gone_s"] is None else f"{result['gone_s']:.3f} s"
        stop = "n/a" if result["stop_s"] is None else f"{result['stop_s']:.3f} s"
        print(f"trial {i + 1:3d} {signal.Signals(sig).name:7s} gone from the peer's graph after {gone:>10s}, "
              f"stop {stop:>8s}, exit {result['exit_code']}, DDS segments {len(result['segments'])}, "
              f"left in /dev/shm: {result['leftover_shm'] or 'none'}", flush=True)
    gone = [r["gone_s"] for _, r in results if r["gone_s"] is not None]
    lingered = sum(1 for _, r in results if r["gone_s"] is None or r["gone_s"] >= 1.0)
    leftovers = sum(1 for _, r in results if r["leftover_shm"])
    p50, worst = (statistics.median(gone), max(gone)) if gone else (float("nan"), float("nan"))
    print(f"\n{len(results)} trials ({args.signal}{', idle' if args.idle else ', inferring'}): gone after "
          f"p50 {p50:.3f} s, max {worst:.3f} s; seen for 1 s or more: {lingered}; trials leaving /dev/shm files: "
          f"{leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Watch a running `pi05_policy` node: print what it reports on /diagnostics and summarize the stage timings.

    ros2 run pi05_ros policy_monitor --namespace /pi05_demo --duration 20
    install/pi05_ros/lib/pi05_ros/policy_monitor --namespace /pi05_demo   (here, without ros2 run)

Waits for the first action chunk (up to --startup-timeout), then listens for --duration seconds and prints a
table of the per-stage latencies from the node's last status. Exit code 0 when chunks arrived, 1 otherwise.
scripts/demo.sh uses it to show the demo loop's timings.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from pi05_ros.msg import ActionChunk

LEVEL_NAMES = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}


class Monitor(Node):
    def __init__(self, namespace: str) -> None:
        super().__init__("pi05_monitor", namespace=namespace)
        self._status_name = f"{self.get_namespace().rstrip('/')}/pi05_policy: policy"
        self._lock = threading.Lock()
        self.chunks = 0
        self.first_chunk_at: float | None = None
        self.last_chunk: Any = None
        self.statuses: list[Any] = []
        self.create_subscription(ActionChunk, "action_chunk", self._on_chunk, 10)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._lock:
            self.chunks += 1
            self.last_chunk = msg
            if self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self._status_name:
                with self._lock:
                    self.statuses.append(status)
                print_status_line(status)


def _level(status: Any) -> int:
    return status.level[0] if isinstance(status.level, bytes | bytearray) else int(status.level)


def rate_text(values: dict[str, str]) -> str:
    """The measured rate against the configured target ("9.8 / 10 Hz"); no figure before one is measured."""
    target = values.get("target_rate_hz", "n/a")
    of_target = f" / {target} Hz" if target != "n/a" else " Hz"
    if values.get("published_chunks", "0") == "0":
        return "waiting"
    if values.get("rate_measured") != "true":
        return "measuring" + (f" ({target} Hz target)" if target != "n/a" else "")
    return f"{float(values.get('achieved_rate_hz', 'nan')):.1f}{of_target}"


def print_status_line(status: Any) -> None:
    values = {kv.key: kv.value for kv in status.values}
    print(
        f"[{LEVEL_NAMES.get(_level(status), '?'):5}] rate {rate_text(values):<24} "
        f"total p50 {values.get('stage.total.p50_ms', 'n/a'):>8} ms  chunks {values.get('published_chunks', '0'):>5}"
        f"  | {status.message}",
        flush=True,
    )


def stage_table(status: Any) -> str:
    """The per-stage latency table of one status (as the node computed it over its recent inferences)."""
    values = {kv.key: kv.value for kv in status.values}
    stages = [key[len("stage."):-len(".mean_ms")] for key in values if key.startswith("stage.") and
              key.endswith(".mean_ms")]
    lines = [f"{'stage':<14}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    for stage in stages:
        row = [values.get(f"stage.{stage}.{stat}_ms", "n/a") for stat in ("mean", "p50", "p99")]
        lines.append(f"{stage:<14}" + "".join(f"{cell:>10}" for cell in row))
    facts = ", ".join(f"{key} {values[key]}" for key in ("device", "precision", "denoise_steps",
                                                          "achieved_rate_hz", "published_chunks") if key in values)
    lines.append(facts)
    lines.append(f"model: {values.get('model', '?')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default="/", help="namespace of the pi05_policy node")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to watch after the first chunk")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for a first chunk")
    args = parser.parse_args(argv)

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    monitor = Monitor(args.namespace)
    executor = SingleThreadedExecutor()
    executor.add_node(monitor)
    start = time.monotonic()
    try:
        while True:
            executor.spin_once(timeout_sec=0.1)
            now = time.monotonic()
            first = monitor.first_chunk_at
            if first is None and now - start > args.startup_timeout:
                print(f"no action chunk within {args.startup_timeout:g} s", file=sys.stderr)
                break
            if first is not None and now - first >= args.duration:
                break
    except KeyboardInterrupt:
        pass
    finally:
        executor.shutdown(timeout_sec=0.5)
        monitor.destroy_node()
        rclpy.try_shutdown()

    if monitor.statuses:
        print("\nStage latencies reported on /diagnostics (last status):")
        print(stage_table(monitor.statuses[-1]))
    chunk = monitor.last_chunk
    if chunk is not None:
        print(f"received {monitor.chunks} action chunks; last: {chunk.horizon}x{chunk.action_dim}, "
              f"{chunk.denoise_steps} steps, latency {chunk.inference_latency * 1e3:.1f} ms, "
              f"joints {list(chunk.joint_names)}")
    return 0 if monitor.chunks else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Parameter requests to a running policy node under heavy CPU load: how many replies are lost, and why
(issue 11 item 7).

    source scripts/env.sh && python tools/param_replies.py [--requests 600] [--load 4] [--mode persistent]

The installed policy_node (CPU demo model) infers at 10 Hz with inputs flowing while `--load` busy-loop
processes compete for the CPU; then `--requests` set_parameters calls (rate_hz alternating 9.0 / 10.0, the kind of
call `ros2 param set` makes) are sent one after another, each waiting up to `--timeout` s for its reply:
- persistent: one parameter client for every request (a tool or a lifecycle manager that lives);
- fresh-client: a new client on the same node per request, asked as soon as wait_for_services says the service
  is there;
- fresh-context: a new rclpy context (a new DDS participant, like one `ros2 param set` process) per request.
It prints the lost replies and the reply times, and counts the node's "failed to send response" lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "ros"))

from ros_harness import (  # noqa: E402
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    unique_namespace,
)

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def request(node, target: str, value: float, timeout: float) -> float | None:
    """One set_parameters through a new client on `node` (as `ros2 param set` makes one), asked as soon as
    wait_for_service sees the service; seconds until the reply, None if none came."""
    from rcl_interfaces.srv import SetParameters

    client = node.create_client(SetParameters, f"{target}/set_parameters")
    try:
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        return _set(client, value, timeout)
    finally:
        node.destroy_client(client)


def _set(client, value: float, timeout: float) -> float | None:
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    request = SetParameters.Request(parameters=[Parameter("rate_hz", value=value).to_parameter_msg()])
    start = time.monotonic()
    future = client.call_async(request)
    while not future.done() and time.monotonic() - start < timeout:
        time.sleep(0.002)
    if not future.done():
        return None
    assert future.result().results[0].successful
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--load", type=int, default=4, help="busy-loop processes beside the node")
    parser.add_argument("--mode", choices=("persistent", "fresh-client", "fresh-context"), default="persistent")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for one reply")
    args = parser.parse_args()

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    namespace = unique_namespace("pi05_params")
    driver = Driver(namespace)
    driver.say("stack the blocks")
    node = NodeProcess("policy_node", namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "warmup:=0", "-p", "cpu_threads:=1", params_file=installed_params_file())
    hogs: list[subprocess.Popen] = []
    target = f"{namespace}/pi05_policy"
    times: list[float] = []
    lost = 0
    try:
        if not driver.wait_for_chunks(3, 0.0, NODE_START_TIMEOUT_S):
            print(node.output()[-3000:])
            return 1
        hogs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=3600)]) for _ in range(args.load)]
        time.sleep(2.0)
        chunks_before = len(driver.chunks_since(0.0))
        started = time.monotonic()
        persistent = None
        if args.mode == "persistent":
            from rcl_interfaces.srv import SetParameters

            persistent = driver.node.create_client(SetParameters, f"{target}/set_parameters")
            assert persistent.wait_for_service(timeout_sec=30.0)
        for i in range(args.requests):
            value = 9.0 if i % 2 == 0 else 10.0
            if persistent is not None:
                took = _set(persistent, value, args.timeout)
            elif args.mode == "fresh-client":
                took = request(driver.node, target, value, args.timeout)
            else:
                context = Context()
                rclpy.init(context=context)
                peer = rclpy.create_node(f"param_probe_{uuid.uuid4().hex[:6]}", context=context)
                executor = SingleThreadedExecutor(context=context)
                executor.add_node(peer)
                import threading

                spinning = threading.Event()
                spinning.set()

                def spin(ex=executor, flag=spinning) -> None:
                    while flag.is_set():
                        ex.spin_once(timeout_sec=0.02)

                thread = threading.Thread(target=spin, daemon=True)
                thread.start()
                try:
                    took = request(peer, target, value, args.timeout)
                finally:
                    spinning.clear()
                    thread.join(2.0)
                    executor.shutdown(timeout_sec=1.0)
                    peer.destroy_node()
                    rclpy.try_shutdown(context=context)
            if took is None:
                lost += 1
                print(f"request {i + 1}: no reply within {args.timeout} s", flush=True)
            else:
                times.append(took)
            if (i + 1) % 100 == 0:
                print(f"{i + 1} requests, {lost} lost, reply p50 {1e3 * statistics.median(times):.1f} ms", flush=True)
        elapsed = time.monotonic() - started
        chunks = len(driver.chunks_since(0.0)) - chunks_before
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        node.stop()
        driver.close()
    output = node.output()
    failed_sends = sum(1 for line in output.splitlines() if "failed to send response" in line)
    ordered = sorted(times) or [float("nan")]
    p50, p99, worst = (1e3 * ordered[len(ordered) // 2], 1e3 * ordered[int(0.99 * (len(ordered) - 1))],
                       1e3 * ordered[-1])
    print(f"\nmode {args.mode}, load {args.load} busy processes on {len(os.sched_getaffinity(0))} cores: "
          f"{args.requests} requests in {elapsed:.0f} s, {lost} without a reply within {args.timeout} s; reply p50 "
          f"{p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms; node lines 'failed to send response': "
          f"{failed_sends}; chunks meanwhile {chunks} ({chunks / elapsed:.1f} Hz)")
    for line in output.splitlines():
        if "failed to send response" in line:
            print("  node:", line[:300])
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

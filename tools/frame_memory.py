#!/usr/bin/env python3
"""What huge camera frames leave behind in the node's memory (issue 11 item 5): RSS of the installed policy_node
(CPU demo model) while normal frames flow, during a burst of huge frames, and after normal frames return.

    source scripts/env.sh && python tools/frame_memory.py [--huge 4000x3000] [--seconds 15] [-p name:=value ...]

Phases (each `--seconds` long): normal 640x480 frames on both cameras; huge frames (the node rejects them above
camera.<name>.max_width/max_height, or takes them when the limits are raised with -p); normal frames again. RSS is
read from /proc/<pid>/status once a second; each line gives the phase's last VmRSS with its RssAnon (the node's
own memory) and RssShmem (pages of the peer's shared-memory segment it has read) parts, and the maximum VmRSS.
`--env RMW_FASTRTPS_USE_QOS_FROM_XML=0` starts the node without its Fast DDS profile, for contrast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "ros"))

from ros_harness import (  # noqa: E402
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    make_image,
    publish_large_frames,
    status_values,
    unique_namespace,
)


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and two of its parts: RssAnon (the node's own memory) and RssShmem (pages of peers' DDS shared-memory
    segments it has read: with a large publisher segment, huge frames touch many of them)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            values[key] = int(line.split()[1]) / 1024.0
    return values


def restamped(template, stamp: int):
    template.header.stamp.sec, template.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    return template


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--huge", default="4000x3000", help="WIDTHxHEIGHT of the huge frames")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--huge-period", type=float, default=0.2, help="seconds between huge frames")
    parser.add_argument("-p", dest="params", action="append", default=[], help="extra node parameter name:=value")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE in the node's environment")
    parser.add_argument("--shm-segment-mib", type=int, default=0,
                        help="the publishing peer's Fast DDS shared-memory segment (0: Fast DDS's 512 KB default)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.huge.lower().split("x"))
    if args.shm_segment_mib:
        # a segment that holds a few huge frames, so that they can arrive at all (docs/benchmarks.md §31)
        publish_large_frames(args.shm_segment_mib)

    namespace = unique_namespace("pi05_frames")
    driver = Driver(namespace)
    driver.say("stack the blocks")
    extra = [arg for param in args.params for arg in ("-p", param)]
    node = NodeProcess("policy_node", namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "cpu_threads:=1", "-p", "warmup:=1", *extra, params_file=installed_params_file(),
                       env=dict(item.split("=", 1) for item in args.env))
    pid = node.process.pid
    rows: list[tuple[str, float, float]] = []
    try:
        if not driver.wait_for_chunks(1, 0.0, NODE_START_TIMEOUT_S):
            print(node.output()[-3000:])
            return 1
        normal = {name: make_image(480, 640, "rgb8") for name in driver.image_pubs}
        huge = {name: make_image(height, width, "rgb8") for name in driver.image_pubs}

        def phase(label: str, frames: dict, period: float) -> None:
            driver.feed_period_s = period
            for name in driver.image_pubs:
                driver.image_factory[name] = lambda stamp, m=frames[name]: restamped(m, stamp)
            values, last = [], {}
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(1.0)
                last = memory_mib(pid)
                values.append(last["VmRSS"])
            rows.append((label, values[-1], max(values), last.get("RssAnon", float("nan")),
                         last.get("RssShmem", float("nan"))))
            statuses = driver.statuses_since(end - args.seconds)
            inputs = status_values(statuses[-1]) if statuses else {}
            counts = ", ".join(f"{name} {inputs.get(f'input.{name}.messages', '?')} messages "
                               f"(age {inputs.get(f'input.{name}.age_s', '?')} s)" for name in driver.image_pubs)
            print(f"{label:32s} RSS last {values[-1]:8.1f} MiB (anon {rows[-1][3]:.1f}, shmem {rows[-1][4]:.1f})  "
                  f"max {max(values):8.1f} MiB; {counts}", flush=True)

        phase("normal 640x480 (before)", normal, 0.05)
        phase(f"huge {width}x{height}", huge, args.huge_period)
        phase("normal 640x480 (after)", normal, 0.05)
        phase("normal 640x480 (after, +1 phase)", normal, 0.05)
        last = driver.statuses_since(0.0)[-1] if driver.statuses_since(0.0) else None
        if last is not None:
            values = status_values(last)
            print("diagnostics:", last.message[:300])
            print({k: v for k, v in values.items() if k.startswith("input.base_image")})
        print(f"RSS after - before: {rows[2][1] - rows[0][1]:+.1f} MiB (next phase {rows[3][1] - rows[0][1]:+.1f}); "
              f"RssAnon {rows[2][3] - rows[0][3]:+.1f} MiB (next phase {rows[3][3] - rows[0][3]:+.1f}), RssShmem "
              f"{rows[2][4] - rows[0][4]:+.1f} MiB")
    finally:
        node.stop()
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How many best-effort camera frames Fast DDS delivers between two processes on one machine, by frame size and the
publisher's shared-memory segment (docs/benchmarks.md §31).

    source scripts/env.sh && python tools/frame_loss.py [--sizes 64x64,320x240,400x300,640x480] [--seconds 10]

For each size: a subscriber process (sensor-data QoS, as the policy node subscribes) counts the frames of two
topics while a publisher process sends both at 20 Hz, once with Fast DDS's defaults (a 512 KB segment) and once
with config/fastdds_large_frames.xml (16 MiB). Only the publisher gets the profile. Frames sent before the
subscriber matched are not counted as lost (the publisher starts sending 2 s after both are up); the subscriber
counts until the publisher has exited. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TOPICS = ("frames_a", "frames_b")


def subscriber() -> None:
    """Count the frames of each topic until a line arrives on stdin, then print the counts."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node(f"frame_loss_sub_{os.getpid()}")
    counts = dict.fromkeys(TOPICS, 0)
    for topic in TOPICS:
        node.create_subscription(Image, topic, lambda _, t=topic: counts.__setitem__(t, counts[t] + 1),
                                 qos_profile_sensor_data)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), done.set()), daemon=True).start()
    print("ready", flush=True)
    while not done.is_set():
        rclpy.spin_once(node, timeout_sec=0.05)
    print(" ".join(str(counts[t]) for t in TOPICS), flush=True)


def publisher(width: int, height: int, seconds: float) -> None:
    """Send one `width` x `height` rgb8 frame on each topic at 20 Hz for `seconds`, once both topics have a
    subscriber (and 2 s more for discovery to settle); print how many were sent per topic."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node(f"frame_loss_pub_{os.getpid()}")
    publishers = [node.create_publisher(Image, topic, qos_profile_sensor_data) for topic in TOPICS]
    frame = Image(height=height, width=width, encoding="rgb8", step=3 * width, data=bytes(3 * width * height))
    deadline = time.monotonic() + 10.0
    while any(p.get_subscription_count() == 0 for p in publishers) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    sent, next_at, end = 0, time.monotonic(), time.monotonic() + seconds
    while time.monotonic() < end:
        for p in publishers:
            p.publish(frame)
        sent += 1
        next_at += 0.05
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(sent, flush=True)
    time.sleep(1.0)


def run(width: int, height: int, seconds: float, profile: Path | None) -> tuple[int, list[int]]:
    """One trial: (frames sent per topic, frames received on each topic). Only the publisher gets `profile`."""
    env = dict(os.environ)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    sub = subprocess.Popen([sys.executable, __file__, "--role", "sub"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env)
    assert sub.stdin is not None and sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        raise RuntimeError("the subscriber process did not start")
    if profile is not None:
        env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    try:
        pub = subprocess.run([sys.executable, __file__, "--role", "pub", "--size", f"{width}x{height}",
                              "--seconds", str(seconds)], capture_output=True, text=True, env=env, check=True,
                             timeout=seconds + 60.0)
    finally:
        received_text = sub.communicate("stop\n", timeout=30)[0]
    return int(pub.stdout.split()[-1]), [int(v) for v in received_text.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64,320x240,400x300,640x480,1280x720")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--role", choices=("sub", "pub"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "sub":
        subscriber()
        return 0
    if args.role == "pub":
        width, height = (int(v) for v in args.size.split("x"))
        publisher(width, height, args.seconds)
        return 0
    from ament_index_python.packages import get_package_share_directory

    profile = Path(get_package_share_directory("pi05_ros")) / "config" / "fastdds_large_frames.xml"
    print("| frame | bytes | publisher's segment | sent per topic | received (topic a / b) | delivered |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        for label, chosen in (("512 KB (default)", None), ("16 MiB (fastdds_large_frames.xml)", profile)):
            sent, received = run(width, height, args.seconds, chosen)
            share = 100.0 * sum(received) / (len(received) * sent)
            print(f"| {size} | {3 * width * height:,} | {label} | {sent} | {' / '.join(map(str, received))} | "
                  f"{share:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

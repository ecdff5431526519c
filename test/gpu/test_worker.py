"""The node's inference thread on a GPU with the fast policy (the GPU machine has no ROS: the worker and its
input buffers import none, so the real thread runs here; the ROS wiring around it is tested in test/ros)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pi05_ros.engine.policy import Policy
from pi05_ros.ros.inputs import InputBuffers
from pi05_ros.ros.settings import CameraConfig, RuntimeSettings
from pi05_ros.ros.worker import InferenceWorker, Phase

pytestmark = pytest.mark.gpu


def test_worker_runs_fast_policy_at_rate_and_follows_step_changes() -> None:
    cameras = (CameraConfig("base_image", "base_0_rgb", "raw"), CameraConfig("wrist_image", "left_wrist_0_rgb", "raw"))
    inputs = InputBuffers([c.name for c in cameras])
    settings = {"now": RuntimeSettings(denoise_steps=10, rate_hz=30.0, default_instruction="",
                                       publish_joint_trajectory=True)}
    chunks: list = []
    got = threading.Event()

    def publish(chunk, observation, latency_s, started_ns, elapsed_s) -> None:  # noqa: ANN001
        chunks.append(chunk)
        if len(chunks) >= 150:  # 5 s at 30 Hz: longer than the worker's 3 s rate window
            got.set()

    worker = InferenceWorker(lambda: Policy.demo(device="cuda", precision="fp8"), inputs, cameras,
                             lambda: settings["now"], publish, max_input_age_s=5.0, warmup=2)
    worker.set_active(True)  # the node's lifecycle activate
    worker.start()
    assert worker.ready.wait(300), "the policy did not load"
    assert worker.status().phase is Phase.RUNNING, worker.status().fatal_error

    rng = np.random.default_rng(0)
    stop_feeding = threading.Event()

    def feed() -> None:  # cameras at ~60 Hz, joint states at ~100 Hz, as a robot would publish
        while not stop_feeding.is_set():
            for name in inputs.cameras:
                frame = inputs.cameras[name].spare((480, 640, 3))
                frame[...] = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
                inputs.cameras[name].commit(frame, time.time_ns())
            joints = inputs.joints.spare((7,))
            joints[...] = rng.uniform(-1, 1, 7)
            inputs.joints.commit(joints, time.time_ns())
            time.sleep(0.01)

    feeder = threading.Thread(target=feed, daemon=True)
    inputs.instruction.set("put the cup in the sink")
    feeder.start()
    try:
        assert got.wait(60), f"only {len(chunks)} chunks: {worker.status()}"
        status = worker.status()
        assert status.achieved_rate_hz >= 0.9 * 30.0, status  # the fast path keeps up with 30 Hz
        assert all(c.actions.shape == (50, 7) and c.num_steps == 10 for c in chunks)
        assert status.last_latency_ms is not None and status.last_latency_ms < 33.0
        print(f"WORKER fp8 rate {status.achieved_rate_hz:.1f} Hz, latency {status.last_latency_ms:.1f} ms, "
              f"stage p50 total {status.stage_stats['total']['p50']:.2f} ms")
        settings["now"] = RuntimeSettings(denoise_steps=3, rate_hz=30.0, default_instruction="",
                                          publish_joint_trajectory=True)
        worker.wake()
        count = len(chunks)
        deadline = time.monotonic() + 30  # the first 3-step chunk captures its graph once
        while time.monotonic() < deadline and not any(c.num_steps == 3 for c in chunks[count:]):
            time.sleep(0.05)
        assert any(c.num_steps == 3 for c in chunks[count:])
    finally:
        stop_feeding.set()
        started = time.monotonic()
        stopped = worker.stop(timeout=1.0)
        assert stopped and time.monotonic() - started < 1.0

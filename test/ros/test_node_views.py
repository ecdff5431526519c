"""prepare_views: the node resizes each camera frame in its callback (on_arrival) or in the inference
(in_inference); either way its chunks are those of `Policy.infer` on the frames as they were sent, and /diagnostics
says what resizing on arrival costs per camera. (auto, the default, is in_inference on this CPU: test_node.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    NodeProcess,
    installed_params_file,
    make_image,
    status_values,
    unique_namespace,
)

SEED = 5
TASK = "fold the towel"


@pytest.mark.parametrize("where", ["on_arrival", "in_inference"])
def test_views_resized_on_arrival_or_in_the_inference_give_the_chunks_of_local_inference(
        driver_factory, where: str) -> None:
    from pi05_ros.engine.policy import Policy

    namespace = unique_namespace("pi05_views")
    driver = driver_factory(namespace)
    driver.say(TASK)
    node = NodeProcess("policy_node", namespace, "-p", f"prepare_views:={where}",
                       "-p", f"seed:={SEED}", "-p", "warmup:=0", "-p", "rate_hz:=4.0", "-p", "cpu_threads:=1",
                       "-p", f"state_joint_names:=[{', '.join(JOINTS)}]", params_file=installed_params_file())
    try:
        chunks = driver.wait_for_chunks(3, 0.0, NODE_START_TIMEOUT_S)
        assert len(chunks) >= 3, node.output()
        # a status from after those chunks: the model loaded and frames have arrived since
        status = driver.wait_for_status(time.monotonic(), 10.0, lambda s: "input.base_image.age_s" in status_values(s))
        assert status is not None, "no /diagnostics with the inputs"
    finally:
        node.stop()
    values = status_values(status)
    for camera in ("base_image", "wrist_image"):
        if where == "on_arrival":
            assert 0.0 < float(values[f"input.{camera}.prepare_ms"]) < 1000.0
        else:
            assert f"input.{camera}.prepare_ms" not in values
    # The driver's inputs never change: the same two gradient images, joint j at 0.1 j, the same task.
    images = {"base_0_rgb": _pixels(120, 160), "left_wrist_0_rgb": _pixels(120, 176)}
    state = np.array([0.1 * i for i in range(len(JOINTS))], np.float32)
    local = Policy.demo(device="cpu", seed=SEED)
    for chunk in sorted(chunks, key=lambda c: c.sequence)[:3]:
        want = local.infer(images, state, TASK, chunk.denoise_steps).actions
        got = np.asarray(chunk.actions, np.float32).reshape(chunk.horizon, chunk.action_dim)
        # the same float32 model and resize on the same CPU; thread counts differ between the processes: ~1e-6
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _pixels(height: int, width: int) -> np.ndarray:
    msg = make_image(height, width)
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(height, width, 3)

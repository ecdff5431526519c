"""prepare_views: the node resizes each camera frame in its callback (on_arrival) or in the inference
(in_inference); either way its chunks are those of `Policy.infer` on the frames as they were sent, and /diagnostics
says what resizing on arrival costs per camera. (auto, the default, is in_inference on this CPU: test_node.py.)"""

from __future__ import annotations

import time

import pytest
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    NodeProcess,
    assert_chunks_are_local_inference,
    installed_params_file,
    status_values,
    unique_namespace,
)

SEED = 5
TASK = "fold the towel"


@pytest.mark.parametrize("where", ["on_arrival", "in_inference"])
def test_views_resized_on_arrival_or_in_the_inference_give_the_chunks_of_local_inference(
        driver_factory, where: str) -> None:
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
    assert_chunks_are_local_inference(chunks, SEED, TASK)

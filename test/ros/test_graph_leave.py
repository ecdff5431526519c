"""A cleanly stopped node leaves the ROS graph at once, every time, and leaves no shared memory behind (issue 11
item 2: before the lifecycle state machine was destroyed, a peer still saw the node for the ~20 s DDS lease after
4 of 6 clean stops). tools/graph_leave_trials.py runs the same trial many times (docs/benchmarks.md §29)."""

from __future__ import annotations

import signal

import pytest
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    NodeProcess,
    installed_params_file,
    stop_and_watch_graph,
    unique_namespace,
)

TRIALS = (signal.SIGINT, signal.SIGTERM, signal.SIGINT)


@pytest.mark.parametrize("trial", range(len(TRIALS)))
def test_a_clean_stop_leaves_the_graph_within_a_second_and_removes_its_dds_segments(driver_factory, trial) -> None:
    namespace = unique_namespace("pi05_leave")
    driver = driver_factory(namespace)
    driver.say("stack the blocks")
    node = NodeProcess("policy_node", namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "warmup:=0", "-p", "cpu_threads:=1", params_file=installed_params_file())
    try:
        assert driver.wait_for_chunks(2, 0.0, NODE_START_TIMEOUT_S), node.output()[-3000:]  # inferring
        assert driver.sees_node()
        result = stop_and_watch_graph(node, driver, TRIALS[trial], watch_s=5.0)
        output = node.output()
        assert result["exit_code"] == 0, output[-3000:]
        assert result["stop_s"] is not None and result["stop_s"] < 1.0, result
        # A peer's graph drops the node when its DDS participant announces leaving, not at the lease's end.
        assert result["gone_s"] is not None and result["gone_s"] < 1.0, (result, output[-3000:])
        # Fast DDS removes its participant segment and the port segments nobody else uses on a clean leave.
        assert any(not name.startswith("fastrtps_port") for name in result["segments"]), result  # it had its own
        assert result["leftover_shm"] == [], result
        assert "Traceback" not in output
    finally:
        node.stop()

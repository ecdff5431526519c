"""Fault runs against a running node (issue 11): a camera that stops and returns, joint states at 1 kHz,
instructions changing at 10 Hz, the instruction publisher restarting (transient local), parameter changes during
inference, and a GPU error raised inside the runner (test/ros/fault_node.py injects it while a file exists). In
each the node reports, holds or recovers as docs/ros_node.md says, and loses nothing it accepted: every chunk it
published arrives, numbered without a gap (reliable QoS), and the task and parameters it took stay in effect.

One node (CPU demo model, chunk mode, commanding) serves the module; the last test stops it during a fault.
Longer versions of these runs: tools/soak.py --faults (docs/benchmarks.md §30).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    stamp_ns,
    status_level,
    status_values,
    unique_namespace,
)

WARN, ERROR = 1, 2
INSTRUCTION = "stack the blocks"
RECOVERY_TIMEOUT_S = 15.0  # generous for a loaded 2-core machine; normally about a second
FAULT_NODE = Path(__file__).resolve().parent / "fault_node.py"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> Iterator[tuple[NodeProcess, Driver, Path]]:
    fault_file = tmp_path_factory.mktemp("faults") / "fail_inference"
    namespace = unique_namespace("pi05_faults")
    driver = Driver(namespace)
    driver.say(INSTRUCTION)
    node = NodeProcess(FAULT_NODE, namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "rate_hz:=10.0", "-p", "warmup:=1", "-p", "cpu_threads:=1",
                       "-p", "allow_demo_commands:=true", params_file=installed_params_file(),
                       env={"PI05_FAULT_FILE": str(fault_file)})
    try:
        if not driver.wait_for_chunks(2, 0.0, NODE_START_TIMEOUT_S):
            pytest.fail(f"no chunk within {NODE_START_TIMEOUT_S} s:\n{node.output()[-3000:]}")
        yield node, driver, fault_file
    finally:
        fault_file.unlink(missing_ok=True)
        node.stop()
        driver.close()


def assert_nothing_lost(driver: Driver) -> None:
    """Every chunk the node published so far arrived, in order, numbered without a gap."""
    sequences = [chunk.sequence for _, chunk in driver.snapshot()[0]]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), np.diff(sequences)


def latest_values(driver: Driver, since: float, timeout: float, where) -> dict[str, str]:
    status = driver.wait_for_status(since, timeout, lambda s: where(status_values(s)))
    assert status is not None, [s.message for s in driver.statuses_since(since)][-3:]
    return status_values(status)


def healthy(status) -> bool:
    values = status_values(status)
    return status_level(status) == 0 or (values["problem_count"] == "1" and "below rate_hz" in status.message)


def wait_healthy(node: NodeProcess, driver: Driver) -> None:
    since = time.monotonic()
    assert driver.wait_for_chunks(2, since, RECOVERY_TIMEOUT_S), node.output()[-3000:]
    assert driver.wait_for_status(since, RECOVERY_TIMEOUT_S, healthy), \
        [s.message for s in driver.statuses_since(since)][-3:]


def log_lines(node: NodeProcess, since: int) -> list[str]:
    return node.output()[since:].splitlines()


def test_a_camera_that_stops_warns_holds_and_recovers_when_it_returns(faulty) -> None:
    node, driver, _ = faulty
    log_from = len(node.output())
    driver.paused_cameras.add("wrist_image")
    stopped = time.monotonic()
    try:
        status = driver.wait_for_status(stopped, 10.0, lambda s: "'wrist_image' is stale" in s.message)
        assert status is not None and status_level(status) == WARN
        assert "'base_image'" not in status.message  # only the camera that stopped is named
        # The hold: one one-point trajectory, stamp 0 (JTC runs it on arrival), within a control period of the
        # input going stale (0.5 s after its last frame; 0.3 s of slack for DDS and a loaded machine).
        held = [t for t in driver.trajectories_since(stopped) if stamp_ns(t.header.stamp) == 0]
        assert held and len(held[0].points) == 1
        quiet = time.monotonic() + 0.3
        time.sleep(1.0)
        assert driver.chunks_since(quiet) == []
    finally:
        driver.paused_cameras.clear()
    wait_healthy(node, driver)
    assert_nothing_lost(driver)
    assert node.wait_for_log(log_from, lambda log: "cleared after" in log, 10.0)
    lines = log_lines(node, log_from)
    assert sum("'wrist_image' is stale" in line and "[WARN]" in line and "commands hold" not in line
               for line in lines) == 1, lines
    assert any("commands hold: 'wrist_image' is stale" in line for line in lines)
    assert any(line.endswith("commanding") for line in lines)


def test_joint_states_at_1khz_keep_the_rate_diagnostics_and_parameters_going(faulty) -> None:
    node, driver, _ = faulty

    before = latest_values(driver, time.monotonic(), 5.0, lambda v: "input.joint_states.messages" in v)
    published = 0
    stop = threading.Event()

    def flood() -> None:
        nonlocal published
        period, next_at = 0.001, time.monotonic()
        while not stop.is_set():
            msg = Driver.good_joints(time.time_ns())
            driver.joint_pub.publish(msg)
            published += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    thread = threading.Thread(target=flood, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        time.sleep(1.0)
        window = time.monotonic()
        reply = driver.set_parameter("denoise_steps", 8, timeout=10.0)
        assert reply.successful
        replied = time.monotonic()
        time.sleep(4.0)
        statuses = driver.statuses_since(window)
        chunks = driver.chunks_since(window)
        after_reply = driver.chunks_since(replied)
    finally:
        stop.set()
        thread.join(2.0)
        assert driver.set_parameter("denoise_steps", 10).successful
    elapsed = time.monotonic() - start
    rate = published / elapsed
    assert rate > 300, f"the test could only publish {rate:.0f} Hz"  # the flood really happened
    after = latest_values(driver, time.monotonic(), 5.0, lambda v: "input.joint_states.messages" in v)
    received = int(after["input.joint_states.messages"]) - int(before["input.joint_states.messages"])
    # Best-effort sensor QoS may drop some under load; most arrive and each is converted in the callback.
    assert received >= 0.5 * published, (received, published)
    # /diagnostics keeps its 1 Hz on the same executor: at least 3 of the 4 s window's statuses came.
    assert len(statuses) >= 3, len(statuses)
    # Inference goes on at what the loaded CPU allows: the chunks' own latencies give the capacity.
    latencies = np.array([c.inference_latency for c in chunks])
    assert len(chunks) >= 0.5 * min(10.0, 1.0 / latencies.mean()) * 4.0, (len(chunks), latencies.mean())
    # The parameter set during the flood took effect: every chunk after the reply but the first (whose inference
    # may have started before it; under load the reply itself can trail several chunks) ran 8 steps.
    assert len(after_reply) >= 2 and all(c.denoise_steps == 8 for c in after_reply[1:]), [
        c.denoise_steps for c in after_reply]
    assert_nothing_lost(driver)
    print(f"1 kHz flood: published {rate:.0f} Hz, the node converted {received / elapsed:.0f} Hz, "
          f"{len(chunks) / 4.0:.1f} chunks/s, inference {1e3 * latencies.mean():.0f} ms mean")


def test_instructions_changing_at_10hz_are_all_taken_and_the_last_is_used(faulty) -> None:
    node, driver, _ = faulty
    log_from = len(node.output())
    before = latest_values(driver, time.monotonic(), 5.0, lambda v: "input.instruction.messages" in v)
    since = time.monotonic()
    for i in range(50):
        driver.say(f"task number {i}")
        time.sleep(0.1)
    after = latest_values(driver, time.monotonic(), 10.0, lambda v: v.get("prompt.text") == "task number 49")
    # Reliable, depth 1: at 10 Hz the executor takes each one.
    assert int(after["input.instruction.messages"]) - int(before["input.instruction.messages"]) == 50
    assert len(driver.chunks_since(since)) >= 10  # inference never paused for a change
    # The last instruction's line is in the log before its prompt reaches /diagnostics; the output can trail.
    assert node.wait_for_log(log_from, lambda log: "instruction: 'task number 49'" in log, 10.0)
    assert sum("instruction: 'task number" in line for line in log_lines(node, log_from)) == 50
    driver.say(INSTRUCTION)
    latest_values(driver, time.monotonic(), 10.0, lambda v: v.get("prompt.text") == INSTRUCTION)
    assert_nothing_lost(driver)


class InstructionPublisher:
    """A separate process's worth of ROS: its own context (DDS participant) with a latched instruction."""

    def __init__(self, namespace: str, text: str) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"instruction_pub_{uuid.uuid4().hex[:6]}", namespace=namespace,
                                      context=self.context)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_publisher(String, "instruction", latched).publish(String(data=text))

    def close(self) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def test_an_instruction_publisher_that_restarts_hands_over_its_latched_task(faulty) -> None:
    node, driver, _ = faulty
    first = InstructionPublisher(driver.namespace, "wipe the table")
    try:
        latest_values(driver, time.monotonic(), 15.0, lambda v: v.get("prompt.text") == "wipe the table")
    finally:
        first.close()  # the publisher goes away: the node keeps the task it accepted
    gone = time.monotonic()
    time.sleep(2.0)
    values = latest_values(driver, gone + 1.0, 5.0, lambda v: "prompt.text" in v)
    assert values["prompt.text"] == "wipe the table" and len(driver.chunks_since(gone)) >= 3
    second = InstructionPublisher(driver.namespace, "open the drawer")  # restarted: latched sample on match
    try:
        latest_values(driver, time.monotonic(), 15.0, lambda v: v.get("prompt.text") == "open the drawer")
    finally:
        second.close()
    driver.say(INSTRUCTION)
    latest_values(driver, time.monotonic(), 10.0, lambda v: v.get("prompt.text") == INSTRUCTION)
    assert_nothing_lost(driver)


def test_parameter_changes_during_inference_all_get_replies_and_apply(faulty) -> None:
    node, driver, _ = faulty
    replies = []
    since = time.monotonic()
    for i in range(40):
        start = time.monotonic()
        assert driver.set_parameter("denoise_steps", 3 if i % 2 == 0 else 5, timeout=10.0).successful
        assert driver.set_parameter("rate_hz", 9.0 if i % 2 == 0 else 10.0, timeout=10.0).successful
        replies.append(time.monotonic() - start)
    # The last values (5 steps, 10 Hz) are in effect from the next inference on.
    later = driver.wait_for_chunks(3, time.monotonic() + 0.3, 10.0)
    assert len(later) >= 3 and all(c.denoise_steps == 5 for c in later)
    assert {c.denoise_steps for c in driver.chunks_since(since)} <= {3, 5, 10}
    assert driver.set_parameter("denoise_steps", 10).successful
    assert_nothing_lost(driver)
    print(f"80 parameter sets during inference: two replies took {1e3 * np.median(replies):.0f} ms (p50), "
          f"{1e3 * max(replies):.0f} ms (max)")


def test_commanding_turned_off_during_an_inference_keeps_its_chunk_off_the_robot(faulty) -> None:
    """publish_joint_trajectory set false while an inference runs (an operator handing the controller to another
    source): that inference's chunk is still published on the chunk topic but commands nothing (it was judged by
    the settings at its start and went out as a trajectory); commanding turned on again resumes."""
    node, driver, fault_file = faulty
    # each inference 0.25 s longer: its chunk still has actions inside max_input_age_s (0.5 s), and one that begins
    # as the last ends is under way well past the parameter change
    fault_file.write_text("slow 0.25")
    try:
        assert driver.wait_for_chunks(2, time.monotonic(), 10.0), node.output()[-3000:]  # the slow ones run
        assert driver.wait_for_chunks(1, time.monotonic(), 10.0)  # one just ended: the next has just begun
        assert driver.set_parameter("publish_joint_trajectory", False, timeout=10.0).successful
        off = time.monotonic()
        assert driver.wait_for_chunks(2, off, 10.0), node.output()[-3000:]  # inferences ended after the change
        # 0.1 s for what was in flight when the parameter changed
        assert driver.trajectories_since(off + 0.1) == []
    finally:
        fault_file.unlink(missing_ok=True)
        assert driver.set_parameter("publish_joint_trajectory", True, timeout=10.0).successful
    on = time.monotonic()
    wait_healthy(node, driver)
    assert driver.trajectories_since(on), node.output()[-3000:]
    assert_nothing_lost(driver)


def test_a_gpu_error_inside_an_inference_is_reported_holds_and_recovers(faulty) -> None:
    node, driver, fault_file = faulty
    log_from = len(node.output())
    before = latest_values(driver, time.monotonic(), 5.0, lambda v: "failed_inferences" in v)
    fault_file.touch()
    since = time.monotonic()
    try:
        status = driver.wait_for_status(since, 10.0, lambda s: "inference failed: RuntimeError: CUDA error: an "
                                                              "illegal memory access" in s.message)
        assert status is not None and status_level(status) == ERROR
        time.sleep(2.0)  # ~20 failed inferences
        quiet = time.monotonic()
        time.sleep(1.0)
        assert driver.chunks_since(quiet) == []  # nothing from a failed inference goes out
        held = [t for t in driver.trajectories_since(since) if stamp_ns(t.header.stamp) == 0]
        assert held, "no hold trajectory after the failure"
        failed = latest_values(driver, time.monotonic(), 5.0, lambda v: "failed_inferences" in v)
        assert int(failed["failed_inferences"]) - int(before["failed_inferences"]) >= 10
        assert node.alive()
    finally:
        fault_file.unlink(missing_ok=True)
    wait_healthy(node, driver)
    assert_nothing_lost(driver)
    # Another problem of the fault's seconds (a stale input on a loaded machine) may clear first: wait for this one.
    assert node.wait_for_log(log_from, lambda log: any("cleared after" in line and "inference failed" in line
                                                       for line in log.splitlines()), 10.0)
    lines = log_lines(node, log_from)
    assert sum("traceback shown once" in line for line in lines) == 1, lines  # not one per failed inference
    assert sum("[ERROR]" in line and "inference failed: RuntimeError" in line for line in lines) == 1, lines
    assert sum("cleared after" in line and "inference failed" in line for line in lines) == 1, lines


def test_every_good_chunk_between_intermittent_failures_is_commanded(faulty) -> None:
    """A failed inference stops commands until one succeeds: that success's own chunk runs (it used to be judged
    by the failure before it, so failures every second inference left the robot without a command)."""
    node, driver, fault_file = faulty
    fault_file.write_text("alternate")
    try:
        assert driver.wait_for_status(time.monotonic(), 10.0, lambda s: "inference failed" in s.message)
        since = time.monotonic()
        time.sleep(3.0)  # ~30 inferences at 10 Hz, every second one failing
        chunks = driver.chunks_since(since)
        commanded = [t for t in driver.trajectories_since(since) if stamp_ns(t.header.stamp) != 0]
    finally:
        fault_file.unlink(missing_ok=True)
    assert len(chunks) >= 5, node.output()[-3000:]
    # the chunks are commanded (a trajectory stamped with its observation), beside the holds after each failure;
    # before the fix none was. Most, not all: on a loaded machine an input may go stale for a tick.
    stamps = {stamp_ns(c.header.stamp) for c in chunks[1:-1]}
    ran = stamps & {stamp_ns(t.header.stamp) for t in commanded}
    assert len(ran) >= 0.6 * len(stamps), (len(ran), len(stamps))
    assert node.alive()
    wait_healthy(node, driver)


def test_an_exception_in_a_callback_leaves_the_executor_serving(faulty) -> None:
    """rclpy re-raises a callback's exception from spin_once; the executor thread must go on (it serves every
    subscription, /diagnostics and the parameter and lifecycle services)."""
    node, driver, fault_file = faulty
    log_from = len(node.output())
    fault_file.write_text("callback")
    try:
        driver.say("open the drawer")  # this instruction's callback raises
        assert node.wait_for_log(log_from, lambda log: "a callback failed: RuntimeError: injected callback fault"
                                 in log, 10.0), node.output()[-3000:]
    finally:
        fault_file.unlink(missing_ok=True)
    assert driver.set_parameter("denoise_steps", 5, timeout=10.0).successful
    later = driver.wait_for_chunks(3, time.monotonic() + 0.3, 10.0)
    assert len(later) >= 3 and all(c.denoise_steps == 5 for c in later)
    driver.say(INSTRUCTION)
    assert node.wait_for_log(log_from, lambda log: f"instruction: '{INSTRUCTION}'" in log, 10.0)
    assert driver.set_parameter("denoise_steps", 10).successful
    assert node.alive()
    assert_nothing_lost(driver)


def test_an_inference_returning_nan_actions_publishes_nothing_and_recovers(faulty) -> None:
    node, driver, fault_file = faulty
    fault_file.write_text("nan")
    since = time.monotonic()
    try:
        status = driver.wait_for_status(since, 10.0, lambda s: "non-finite action value" in s.message)
        assert status is not None and status_level(status) == ERROR
        time.sleep(0.5)
        quiet = time.monotonic()
        time.sleep(1.0)
        assert driver.chunks_since(quiet) == []  # no ActionChunk with NaN, no trajectory from it
        assert all(np.isfinite(p.positions).all() for t in driver.trajectories_since(since) for p in t.points)
    finally:
        fault_file.unlink(missing_ok=True)
    wait_healthy(node, driver)
    assert_nothing_lost(driver)


def test_a_signal_during_a_persistent_fault_stops_cleanly(faulty) -> None:
    node, driver, fault_file = faulty
    fault_file.touch()
    since = time.monotonic()
    assert driver.wait_for_status(since, 10.0, lambda s: "inference failed" in s.message)
    node.assert_stopped_within(signal.SIGINT, 1.0)
    assert "Traceback" in node.output()  # the one injected traceback; the stop itself adds none
    assert node.output().count("Traceback") == 1


def test_a_lifecycle_request_during_autostarts_load_is_refused_at_once_and_diagnostics_go_on(tmp_path) -> None:
    """autostart configures from the main thread and holds the transition lock through the model load; a
    lifecycle request (served in the executor thread) used to wait for it, and /diagnostics stopped meanwhile."""
    namespace = unique_namespace("pi05_slow_load")
    driver = Driver(namespace)
    driver.say(INSTRUCTION)
    node = NodeProcess(FAULT_NODE, namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", "warmup:=0", "-p", "cpu_threads:=1", params_file=installed_params_file(),
                       env={"PI05_FAULT_FILE": str(tmp_path / "no_fault"), "PI05_LOAD_DELAY_S": "10"})
    try:
        assert driver.wait_for_status(time.monotonic(), NODE_START_TIMEOUT_S,
                                      lambda s: "loading" in s.message), node.output()[-3000:]
        start = time.monotonic()
        assert not driver.lifecycle("deactivate", timeout=3.0)  # answered, not after the load
        assert time.monotonic() - start < 3.0
        since = time.monotonic()
        assert driver.wait_for_status(since, 2.5, lambda s: "loading" in s.message)  # still reporting
        assert node.wait_for_log(0, lambda log: "another transition is in progress" in log, 5.0)
        assert driver.wait_for_chunks(1, time.monotonic(), NODE_START_TIMEOUT_S), node.output()[-3000:]
        assert node.alive()
    finally:
        node.stop()
        driver.close()

"""The policy node end to end: the installed `policy_node` (demo model, CPU) in a subprocess, driven over
real DDS on loopback by an in-process rclpy node. One node serves the whole module (startup costs seconds);
each test leaves good input flowing, and the last one stops the node with SIGINT.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    make_image,
    stamp_ns,
    status_level,
    status_values,
    unique_namespace,
)

OK, WARN, ERROR = 0, 1, 2
INSTRUCTION = "pick up the red cube and put it in the bowl"
ACTION_NAMES = [f"act_{name}" for name in JOINTS]
ACTION_DT = 0.04
HORIZON, DOF = 10, 7  # the tiny demo model on CPU
STAGES = ("preprocess", "vision", "embed_prefix", "prefill_kv", "denoise", "postprocess", "total")
RECOVERY_TIMEOUT_S = 15.0  # generous for a loaded 2-core CI machine; normally < 1 s


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[NodeProcess, Driver]]:
    namespace = unique_namespace("pi05_node")
    driver = Driver(namespace)
    # Sent before the node exists: transient-local delivery must still bring it the task.
    driver.say(INSTRUCTION)
    node = NodeProcess(
        "policy_node", namespace,
        "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
        "-p", f"action_joint_names:=[{', '.join(ACTION_NAMES)}]",
        "-p", f"action_dt:={ACTION_DT}",
        "-p", "rate_hz:=10.0",
        "-p", "warmup:=1",
        # One torch thread: two OpenMP threads on 2 cores slow down badly when anything else runs beside.
        "-p", "cpu_threads:=1",
        "-p", "allow_demo_commands:=true",  # the demo model commands only when told to (tested elsewhere)
        params_file=installed_params_file(),
    )
    try:
        if not driver.wait_for_chunks(1, 0.0, NODE_START_TIMEOUT_S):
            pytest.fail(f"no action chunk within {NODE_START_TIMEOUT_S} s; node output:\n{node.output()}")
        yield node, driver
    finally:
        node.stop()
        driver.close()


def assert_alive(node: NodeProcess) -> None:
    assert node.alive(), f"the node exited; output:\n{node.output()}"


def assert_publishes_at(driver: Driver, target_hz: float, count: int) -> None:
    """Over `count` chunks: never faster than `target_hz`, and as fast as the inference time allows.

    A rate over a few seconds, not a median of a handful of intervals: DDS hands over late chunks in bursts.
    Chunks that arrive in the first 50 ms may be a backlog from before, so the window starts after them."""
    since = time.monotonic() + 0.05
    driver.wait_for_chunks(count, since, 60.0)
    window = [(when, chunk) for when, chunk in driver.snapshot()[0] if when >= since]
    assert len(window) >= count, f"only {len(window)} chunks arrived"
    arrivals = [when for when, _ in window]
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    # The node keeps a fixed grid: over a few seconds it beats the target by at most the one tick it catches up
    # after a late one (+5 % here), plus arrival jitter at the window's ends.
    assert rate <= 1.1 * target_hz, np.diff(arrivals)
    # What the machine allows: a 2-core CI machine under load can take longer than the period to infer. A late
    # tick starts the next at once, so the rate follows min(target, capacity); 0.6 leaves room for the window's
    # latency spread around its mean.
    latencies = np.array([chunk.inference_latency for _, chunk in window])
    capacity_hz = 1.0 / float(latencies.mean())
    assert rate >= 0.6 * min(target_hz, capacity_hz), (rate, capacity_hz, np.diff(arrivals))
    # No stalls: the inference thread waits only for the CPU. With rclpy's MultiThreadedExecutor spinning beside
    # it single inferences took 20-40x the median (docs/benchmarks.md §16); two busy loops beside: 3.2x.
    assert latencies.max() < 8 * np.median(latencies), latencies


def healthy(status) -> bool:
    # OK, or only a low-rate WARN: other work on a 2-core machine can slow the CPU model below 10 Hz.
    level = status_level(status)
    only_slow = status_values(status)["problem_count"] == "1" and "below rate_hz" in status.message
    return level == OK or (level == WARN and only_slow)


def wait_until_healthy(node: NodeProcess, driver: Driver) -> None:
    """Good input flows again: chunks arrive and /diagnostics no longer reports a problem with the input."""
    since = time.monotonic()
    assert driver.wait_for_chunks(2, since, RECOVERY_TIMEOUT_S), f"no chunks after recovery:\n{node.output()}"
    ok = driver.wait_for_status(since, RECOVERY_TIMEOUT_S, healthy)
    if ok is None:
        recent = [(status_level(s), s.message) for s in driver.statuses_since(since)][-3:]
        pytest.fail(f"diagnostics did not return to OK; last statuses: {recent}")


def test_chunks_arrive_with_shape_names_stamps_and_steps(running) -> None:
    node, driver = running
    since = time.monotonic()
    chunks = driver.wait_for_chunks(8, since, 30.0)
    assert len(chunks) >= 8
    published = driver.published_stamps
    for chunk in chunks:
        assert (chunk.horizon, chunk.action_dim) == (HORIZON, DOF)
        assert len(chunk.actions) == HORIZON * DOF
        assert list(chunk.joint_names) == ACTION_NAMES
        assert chunk.denoise_steps == 10
        assert chunk.action_dt == ACTION_DT  # float64 parameter passed through unchanged
        assert chunk.demo_model is True
        assert list(chunk.action_kinds) == ["position"] * DOF  # the demo's columns: absolute positions
        assert 0.0 < chunk.inference_latency < 5.0
        assert np.all(np.isfinite(np.asarray(chunk.actions)))
        # The stamp is that of one of the observations the driver published (not the node's clock).
        assert stamp_ns(chunk.header.stamp) in published
    sequences = [chunk.sequence for chunk in chunks]
    assert sequences == list(range(sequences[0], sequences[0] + len(chunks)))  # reliable QoS: no gaps
    stamps = [stamp_ns(chunk.header.stamp) for chunk in chunks]
    assert stamps == sorted(stamps)  # always the freshest observation: never older than the last one


def test_chunks_come_at_rate_hz(running) -> None:
    node, driver = running
    assert_publishes_at(driver, 10.0, 31)


def test_joint_trajectory_is_the_chunk_stamped_at_its_observation_and_bounded(running) -> None:
    """execution: chunk (the default). joint_trajectory_controller keeps a past header.stamp and runs point i at
    stamp + time_from_start (ros2_controllers jazzy, FACTS 1.2; the controller itself is not installable here):
    so point k of a chunk carries (k + 1) * action_dt after the observation stamp, the points already due are left
    out, and none is due after stamp + max_input_age_s (0.5) + action_dt."""
    node, driver = running
    since = time.monotonic()
    driver.wait_for_chunks(3, since, 30.0)
    trajectories = driver.trajectories_since(since)
    assert trajectories, "no JointTrajectory arrived"
    chunks = {stamp_ns(c.header.stamp): c for c in driver.chunks_since(since - 2.0)}
    for trajectory in trajectories[:3]:
        assert list(trajectory.joint_names) == ACTION_NAMES
        chunk = chunks[stamp_ns(trajectory.header.stamp)]  # stamped with its chunk's observation
        actions = np.asarray(chunk.actions, np.float32).reshape(HORIZON, DOF)
        times = [p.time_from_start.sec * 1_000_000_000 + p.time_from_start.nanosec for p in trajectory.points]
        first = round(times[0] / (ACTION_DT * 1e9)) - 1
        assert first >= 1  # the CPU model takes longer than one action_dt: action 0 is always late
        assert times == [round((k + 1) * ACTION_DT * 1e9) for k in range(first, first + len(times))]
        assert times[-1] <= round((0.5 + ACTION_DT) * 1e9)
        positions = np.array([point.positions for point in trajectory.points]).astype(np.float32)
        assert np.array_equal(positions, actions[first:first + len(times)])  # float32 -> float64 is exact


def test_diagnostics_carry_every_stage_and_say_demo(running) -> None:
    node, driver = running
    since = time.monotonic()
    status = driver.wait_for_status(
        since, 10.0, lambda s: healthy(s) and "stage.total.p99_ms" in status_values(s)
        and status_values(s)["stage.total.p99_ms"] != "n/a")
    assert status is not None, "no OK diagnostics with stage timings"
    values = status_values(status)
    for stage in STAGES:
        for stat in ("mean", "p50", "p99"):
            value = float(values[f"stage.{stage}.{stat}_ms"])
            assert value >= 0.0 and math.isfinite(value)
    assert float(values["stage.total.mean_ms"]) > 0.0
    assert status.message.startswith("DEMO MODEL")
    assert values["demo_model"] == "true" and values["device"] == "cpu" and values["precision"] == "fp32"
    assert values["denoise_steps"] == "10" and values["target_rate_hz"] == "10"
    assert 0.0 < float(values["achieved_rate_hz"]) <= 12.0  # target 10 Hz; the rate itself is tested above
    for name in ("base_image", "wrist_image", "joint_states"):
        assert float(values[f"input.{name}.age_s"]) < 0.5
    assert "input.base_image.prepare_ms" not in values  # prepare_views auto: resized in the inference on a CPU
    assert values["gpu_memory"].startswith("n/a")
    assert int(values["published_chunks"]) > 0 and "dropped_observations" in values


def test_denoise_steps_change_at_run_time_and_out_of_range_is_rejected(running) -> None:
    node, driver = running
    with driver.parameter_set_to("denoise_steps", 3):
        since = time.monotonic()
        first = driver.wait_for_chunks(1, since, 10.0, where=lambda c: c.denoise_steps == 3)
        assert first, "no chunk with 3 steps after the change"
        later = driver.wait_for_chunks(4, time.monotonic(), 10.0)
        assert [c.denoise_steps for c in later] == [3] * len(later) and len(later) >= 4

        for bad in (0, 101):
            result = driver.set_parameter("denoise_steps", bad)
            assert not result.successful and "range" in result.reason, result.reason
        result = driver.set_parameter("denoise_steps", 2.5)
        assert not result.successful and result.reason
        assert driver.get_parameter("denoise_steps") == 3  # the old value is kept
        result = driver.set_parameter("checkpoint", "/somewhere/else")
        assert not result.successful and "read-only" in result.reason
        assert all(c.denoise_steps == 3 for c in driver.wait_for_chunks(2, time.monotonic(), 10.0))
    assert driver.wait_for_chunks(1, time.monotonic(), 10.0, where=lambda c: c.denoise_steps == 10)
    assert_alive(node)


def test_rate_hz_changes_at_run_time(running) -> None:
    node, driver = running
    with driver.parameter_set_to("rate_hz", 4.0):
        time.sleep(0.5)
        since = time.monotonic()
        assert_publishes_at(driver, 4.0, 13)  # ~3 s; 4.4 Hz at most, far from the old 10 Hz
        status = driver.wait_for_status(since, 5.0, lambda s: status_values(s)["target_rate_hz"] == "4")
        assert status is not None
        assert not driver.set_parameter("rate_hz", 0.0).successful


def test_joint_trajectory_can_be_switched_off(running) -> None:
    node, driver = running
    with driver.parameter_set_to("publish_joint_trajectory", False):
        # The inference running when the switch flips may still publish one: count from the third chunk on.
        assert driver.wait_for_chunks(3, time.monotonic(), 15.0)
        since = time.monotonic()
        assert len(driver.wait_for_chunks(5, since, 15.0)) >= 5
        assert driver.trajectories_since(since) == []
    since = time.monotonic()
    driver.wait_for_chunks(3, since, 15.0)
    assert driver.trajectories_since(since)


def test_stale_inputs_stop_publishing_and_warn(running) -> None:
    node, driver = running
    driver.feeding.clear()
    paused = time.monotonic()
    try:
        status = driver.wait_for_status(paused, 10.0, lambda s: status_level(s) == WARN and "stale" in s.message)
        assert status is not None, "no stale WARN on /diagnostics"
        assert "max_input_age_s" in status.message
        assert int(status_values(status).get("skipped.stale_input", "0")) > 0
        # The worker is one thread: once a tick has found the input stale, no inference runs or starts without
        # fresh input. Only the last chunk published before that tick may still be on its way (0.2 s for DDS).
        quiet_from = time.monotonic() + 0.2
        time.sleep(1.7)
        assert driver.chunks_since(quiet_from) == []
        assert_alive(node)
    finally:
        driver.feeding.set()
    wait_until_healthy(node, driver)


def _bad_encoding(stamp: int):
    msg = make_image(120, 160, "rgb8", stamp)
    msg.encoding = "yuv422"
    return msg


def _bad_length(stamp: int):
    msg = make_image(120, 160, "rgb8", stamp)
    msg.data = bytes(msg.data)[: 119 * msg.step]  # one row short of height*step
    return msg


def _nan_state(stamp: int):
    msg = Driver.good_joints(stamp)
    msg.position[3] = float("nan")
    return msg


def _absurd_joint(stamp: int):
    msg = Driver.good_joints(stamp)  # names: extra_joint, then JOINTS reversed
    msg.position[msg.name.index("joint_3")] = 1e39  # beyond float32: named, not overflowed with a numpy warning
    return msg


def _duplicate_joint(stamp: int):
    msg = Driver.good_joints(stamp)
    msg.name = [*msg.name, "joint_2"]
    msg.position = [*msg.position, 0.7]
    return msg


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_encoding", "encoding 'yuv422' is not supported"),
        ("data_length", "height*step = 120*480 = 57600"),
        ("nan_state", "joint_5 = NaN not finite"),
        ("empty_instruction", "prompt is empty"),
        # well-formed but wrong (issue 11): each refused with its rule, like a malformed message
        ("one_pixel_image", "frame is 1x1, smaller than 16 px on a side"),
        ("frame_over_bound", "frame is 2100x64, larger than camera.base_image.max_width x max_height = 2048x2048"),
        ("absurd_joint", "joint_3 = 1e+39 not finite or beyond max_abs_joint_position 10000"),
        ("duplicate_joint", "names joint(s) joint_2 (at 6, 8) more than once"),
    ],
)
def test_bad_input_reports_error_logs_it_once_keeps_running_and_recovers(running, case: str, expected: str) -> None:
    node, driver = running
    good_image = driver.image_factory["base_image"]
    log_from = len(node.output())
    since = time.monotonic()
    if case == "wrong_encoding":
        driver.image_factory["base_image"] = _bad_encoding
    elif case == "data_length":
        driver.image_factory["base_image"] = _bad_length
    elif case == "nan_state":
        driver.joint_factory = _nan_state
    elif case == "one_pixel_image":
        driver.image_factory["base_image"] = lambda stamp: make_image(1, 1, "rgb8", stamp)
    elif case == "frame_over_bound":
        driver.image_factory["base_image"] = lambda stamp: make_image(64, 2100, "rgb8", stamp)
    elif case == "absurd_joint":
        driver.joint_factory = _absurd_joint
    elif case == "duplicate_joint":
        driver.joint_factory = _duplicate_joint
    else:
        driver.say("")
    try:
        status = driver.wait_for_status(
            since, 10.0, lambda s: status_level(s) in (WARN, ERROR) and expected in s.message)
        assert status is not None, f"no WARN/ERROR mentioning {expected!r}; node output:\n{node.output()[-3000:]}"
        assert status_level(status) == ERROR
        # While the input is bad, nothing is published (after any inference that was already running).
        time.sleep(0.5)
        quiet_from = time.monotonic()
        time.sleep(1.0)
        assert driver.chunks_since(quiet_from) == []
        assert_alive(node)
    finally:
        driver.image_factory["base_image"] = good_image
        driver.joint_factory = Driver.good_joints
        driver.say(INSTRUCTION)
    wait_until_healthy(node, driver)
    # The log names the problem once when it starts (~40 bad messages came) and once when it clears.
    assert node.wait_for_log(log_from, lambda log: any("cleared after" in line and expected in line
                                                           for line in log.splitlines()), timeout=10.0), \
        node.output()[log_from:]
    log = node.output()[log_from:].splitlines()
    started = [line for line in log if "[ERROR]" in line and expected in line]
    cleared = [line for line in log if "cleared after" in line and expected in line]
    assert len(started) == 1 and len(cleared) == 1, "\n".join(log)


def test_an_instruction_longer_than_the_token_limit_warns_and_is_logged_short(running) -> None:
    node, driver = running
    log_from = len(node.output())
    long_task = "put the cup in the sink " * 4200  # 100,800 characters, far beyond the demo's 96 tokens
    since = time.monotonic()
    driver.say(long_task)
    try:
        status = driver.wait_for_status(since, 15.0, lambda s: "more than this model's max_token_len" in s.message)
        assert status is not None, node.output()[-2000:]
        values = status_values(status)
        assert status_level(status) == WARN and values["prompt.truncated"] == "true"
        assert values["prompt.tokens"] == values["prompt.max_tokens"] == "96"
        assert len(values["prompt.text"]) <= 200
        assert driver.wait_for_chunks(3, time.monotonic(), 15.0)  # a cut prompt still drives the policy
    finally:
        driver.say(INSTRUCTION)
    wait_until_healthy(node, driver)
    assert node.wait_for_log(log_from, lambda log: "cleared after" in log, timeout=10.0)
    log = node.output()[log_from:]
    assert max(len(line) for line in log.splitlines()) < 1200, "a log line carries the long instruction"
    assert sum("max_token_len 96" in line and "[WARN]" in line and "cleared" not in line
               for line in log.splitlines()) >= 1
    assert "(100800 characters)" in log  # the instruction line says how long it was


def test_sigint_stops_the_node_within_a_second_and_it_leaves_the_ros_graph(running) -> None:
    node, driver = running
    assert driver.wait_for_chunks(1, time.monotonic(), 10.0)  # busy: inputs flowing, inferences running
    assert driver.sees_node()
    signalled = time.monotonic()
    node.assert_stopped_within(signal.SIGINT, 1.0)
    # A peer's graph drops the node when its DDS participant leaves, not at the ~20 s lease (issue 11 item 2).
    while driver.sees_node() and time.monotonic() - signalled < 5.0:
        time.sleep(0.01)
    gone_after = time.monotonic() - signalled
    assert gone_after < 1.0, f"a peer still saw the stopped node {gone_after:.2f} s after the signal"
    output = node.output()
    assert "Traceback" not in output
    assert "inactive: held, not commanding" in output  # the shutdown transition ran from active

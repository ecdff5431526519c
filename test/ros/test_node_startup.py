"""Starting the node: bad checkpoints and parameters exit with a clear message; a compressed camera as the
trigger works; SIGTERM stops it within a second."""

from __future__ import annotations

import signal
import time

import numpy as np
from ros_harness import (
    JOINTS,
    NODE_START_TIMEOUT_S,
    NodeProcess,
    installed_params_file,
    status_level,
    status_values,
    unique_namespace,
)


def run_to_exit(*ros_args: str, timeout: float = NODE_START_TIMEOUT_S) -> tuple[int, str]:
    node = NodeProcess("policy_node", unique_namespace("pi05_start"), *ros_args,
                       params_file=installed_params_file())
    try:
        code = node.wait(timeout)
    finally:
        node.stop()
    return code, node.output()


def test_bad_checkpoint_path_exits_with_a_clear_message() -> None:
    code, output = run_to_exit("-p", "checkpoint:=/no/such/pi05_checkpoint", "-p", "tokenizer:=/no/such/tok.model")
    assert code == 1, output
    assert "cannot start" in output and "/no/such/pi05_checkpoint" in output and "does not exist" in output
    assert "Traceback" not in output  # a message, not a stack trace


def test_checkpoint_without_tokenizer_exits_with_a_clear_message() -> None:
    code, output = run_to_exit("-p", "checkpoint:=/no/such/pi05_checkpoint")
    assert code == 1, output
    assert "tokenizer is empty; set tokenizer:=" in output and "Traceback" not in output


def test_invalid_startup_parameter_exits_at_once() -> None:
    start = time.monotonic()
    code, output = run_to_exit("-p", "camera.base_image.transport:=h264")
    assert code == 2, output
    assert "bad parameters: camera.base_image.transport is 'h264'; use one of raw, compressed" in output
    assert time.monotonic() - start < 30.0  # before any model work (the bound only guards against a hang)


def test_camera_slot_the_model_lacks_exits_after_loading() -> None:
    code, output = run_to_exit("-p", "camera.base_image.slot:=top_0_rgb", "-p", "warmup:=0")
    assert code == 1, output
    assert "camera.base_image.slot is 'top_0_rgb'" in output and "base_0_rgb" in output
    assert "Traceback" not in output


def test_compressed_trigger_camera_runs_once_per_frame_and_sigterm_stops(driver_factory) -> None:
    namespace = unique_namespace("pi05_trigger")
    # 4 frames per second: slow enough that each frame normally gets its own inference.
    driver = driver_factory(namespace, cameras={"front": "compressed"}, feed_period_s=0.25)
    driver.say("stack the blocks")
    node = NodeProcess(
        "policy_node", namespace,
        "-p", "cameras:=[front]", "-p", "camera.front.slot:=base_0_rgb", "-p", "camera.front.transport:=compressed",
        "-p", "trigger_camera:=front", "-p", "rate_hz:=50.0", "-p", "warmup:=0", "-p", "cpu_threads:=1",
        "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
        params_file=installed_params_file(),
    )
    try:
        assert driver.wait_for_chunks(1, 0.0, NODE_START_TIMEOUT_S), node.output()
        frames_before = driver.frames_published
        since = time.monotonic()
        time.sleep(3.0)
        frames = driver.frames_published - frames_before
        chunks = driver.chunks_since(since)
        # One chunk per frame, not rate_hz's 50 Hz: at most the frames sent (+2 in flight at the window's ends);
        # at least half of them, as a frame that arrives while an inference runs on a loaded CPU merges into the next.
        assert frames // 2 <= len(chunks) <= frames + 2, (len(chunks), frames)
        assert all(np.asarray(c.actions).size == c.horizon * c.action_dim for c in chunks)
        status = driver.wait_for_status(since, 5.0, lambda s: "rate_mode" in status_values(s))
        assert status is not None and status_values(status)["rate_mode"] == "trigger:front"
        assert float(status_values(status)["input.front.age_s"]) < 1.0

        node.assert_stopped_within(signal.SIGTERM, 1.0)
    finally:
        node.stop()


def test_without_instruction_it_warns_then_default_instruction_and_messages_drive_it(driver_factory) -> None:
    namespace = unique_namespace("pi05_prompt")
    driver = driver_factory(namespace)  # feeds images and joints, says nothing
    node = NodeProcess(
        "policy_node", namespace, "-p", "warmup:=0", "-p", "cpu_threads:=1",
        "-p", f"state_joint_names:=[{', '.join(JOINTS)}]", params_file=installed_params_file(),
    )
    try:
        status = driver.wait_for_status(
            0.0, NODE_START_TIMEOUT_S, lambda s: status_values(s)["phase"] == "running" and status_level(s) == 1
            and "no instruction yet" in s.message)
        assert status is not None, node.output()
        assert "default_instruction" in status.message  # the message names the fix
        assert driver.chunks_since(0.0) == []

        # default_instruction changes at run time and is used while no instruction message has come.
        assert driver.set_parameter("default_instruction", "wipe the table").successful
        assert driver.wait_for_chunks(3, time.monotonic(), 15.0), node.output()
        # An instruction message then takes over; an empty default no longer matters.
        driver.say("stack the blocks")
        assert driver.set_parameter("default_instruction", "").successful
        assert driver.wait_for_chunks(3, time.monotonic() + 0.5, 15.0), node.output()
        assert "instruction: 'stack the blocks'" in node.output()
        # The demo model publishes no robot commands unless allow_demo_commands:=true.
        assert driver.trajectories_since(0.0) == [] and driver.commands_since(0.0) == []
        status = driver.wait_for_status(time.monotonic(), 5.0,
                                        lambda s: "execution.commands_enabled" in status_values(s))
        assert status is not None and status_values(status)["execution.commands_enabled"] == "false"
        assert "allow_demo_commands" in status.message
    finally:
        node.stop()


def test_lerobot_checkpoint_camera_names_and_action_space_parameters(driver_factory, tmp_path) -> None:  # noqa: ANN001
    """A LeRobot checkpoint names its cameras: camera.<name>.slot takes the checkpoint's name, and the action
    space parameters reach every chunk's action_kinds."""
    import json

    from pi05_ros.engine.config import TINY
    from pi05_ros.engine.demo import demo_tokenizer, random_model, write_checkpoint

    checkpoint = write_checkpoint(random_model(TINY, seed=5), tmp_path / "lerobot_top", fmt="lerobot")
    config = json.loads((checkpoint / "config.json").read_text())
    config["input_features"] = {"observation.images.top": {"type": "VISUAL", "shape": [3, 480, 640]},
                                "observation.state": {"type": "STATE", "shape": [7]}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    tokenizer = demo_tokenizer(tmp_path / "tok")
    namespace = unique_namespace("pi05_lerobot")
    driver = driver_factory(namespace, cameras={"base_image": "raw"})
    driver.say("stack the blocks")
    node = NodeProcess(
        "policy_node", namespace,
        "-p", f"checkpoint:={checkpoint}", "-p", f"tokenizer:={tokenizer}", "-p", "device:=cpu",
        "-p", "cameras:=[base_image]", "-p", "camera.base_image.slot:=observation.images.top",
        "-p", "action_space:=velocity", "-p", "action_space_mask:=[true, true, true, true, true, true, false]",
        "-p", "warmup:=0", "-p", "cpu_threads:=1", "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
        params_file=installed_params_file(),
    )
    try:
        chunks = driver.wait_for_chunks(1, 0.0, NODE_START_TIMEOUT_S)
        assert chunks, node.output()
        assert list(chunks[0].action_kinds) == ["velocity"] * 6 + ["position"]
        assert "action space:   0:velocity" in node.output() and "cameras:        top" in node.output()
    finally:
        node.stop()


def test_overrides_that_cannot_apply_exit_with_a_message_naming_them() -> None:
    # `-p cameras:=[]` used to start with the default cameras; a double given as 5 ended in a traceback.
    for args, expected in ((("-p", "cameras:=[]"), "bad parameters: parameter `cameras` is empty"),
                           (("-p", "rate_hz:=5"), "bad parameters: parameter rate_hz is set to 5 (an integer)")):
        code, output = run_to_exit(*args, "-p", "autostart:=false", timeout=60.0)
        assert code == 2, output
        assert expected in output and "Traceback" not in output, output

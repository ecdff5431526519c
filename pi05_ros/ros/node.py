"""The `pi05_policy` node (executable `policy_node`): camera images + joint states + an instruction in,
action chunks, joint trajectories and /diagnostics out.

Threads: one SingleThreadedExecutor thread runs the subscription callbacks, the diagnostics timer and the parameter
services; callbacks only convert the newest message into a preallocated buffer. (rclpy's MultiThreadedExecutor
busy-spins while a callback waits for a pool thread, rclpy issue 1452: here it burned half a core and, holding the
GIL, stalled CPU inferences for up to 2.5 s: docs/benchmarks.md §16.) The inference thread (worker.py) owns the
engine and publishes each chunk itself, so nothing on the executor ever waits for an inference. The node does no math.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from pi05_ros.msg import ActionChunk as ActionChunkMsg
from pi05_ros.ros.conversions import (
    ConversionError,
    JointSelector,
    action_chunk_message,
    compressed_to_rgb,
    image_shape,
    image_to_rgb,
    joint_trajectory_message,
    stamp_to_ns,
)
from pi05_ros.ros.diagnostics import DEMO_BANNER, ModelFacts, build_array, build_status
from pi05_ros.ros.inputs import InputBuffers, LatestBuffer
from pi05_ros.ros.observation import Observation
from pi05_ros.ros.params import (
    DYNAMIC_PARAMETERS,
    ConfigError,
    NodeConfig,
    declare_parameters,
    updated_runtime,
    validate_runtime_value,
)
from pi05_ros.ros.process import init_ros
from pi05_ros.ros.settings import RuntimeSettings
from pi05_ros.ros.worker import InferenceWorker

if TYPE_CHECKING:
    from pi05_ros.engine.policy import Policy
    from pi05_ros.engine.runner import ActionChunk

NODE_NAME = "pi05_policy"
DIAGNOSTICS_PERIOD_S = 1.0
STOP_TIMEOUT_S = 0.5  # how long shutdown waits for an inference in flight (the whole stop must take < 1 s)
INSTRUCTION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)


class PolicyNode(Node):
    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.config: NodeConfig = declare_parameters(self)  # raises ConfigError
        self._runtime: RuntimeSettings = self.config.runtime
        # Parameter callbacks only after declaring: declaration itself runs them.
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.model_facts: ModelFacts | None = None
        self._action_names: list[str] = []
        self._sequence = 0

        self.inputs = InputBuffers([camera.name for camera in self.config.cameras])
        self.worker = InferenceWorker(
            self._load_policy, self.inputs, self.config.cameras, lambda: self._runtime, self._publish_chunk,
            max_input_age_s=self.config.max_input_age_s, trigger_camera=self.config.trigger_camera,
            warmup=self.config.warmup,
        )

        self._chunk_pub = self.create_publisher(ActionChunkMsg, "action_chunk", 10)
        self._trajectory_pub = self.create_publisher(JointTrajectory, "joint_trajectory", 10)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._subscribe_inputs()
        self.create_timer(DIAGNOSTICS_PERIOD_S, self.publish_diagnostics)

        if self.config.use_demo_model:
            why = "demo:=true" if self.config.demo else "no checkpoint parameter is set"
            self.get_logger().warning(
                f"{DEMO_BANNER}: {why}, so the built-in random-weight model runs. "
                "Set checkpoint:=... and tokenizer:=... to run a real policy."
            )

    # --- inputs

    def _subscribe_inputs(self) -> None:
        for camera in self.config.cameras:
            buffer = self.inputs.cameras[camera.name]
            if camera.transport == "raw":
                self.create_subscription(Image, camera.topic, lambda msg, b=buffer: self._on_image(b, msg),
                                         qos_profile_sensor_data)
            else:
                self.create_subscription(CompressedImage, camera.topic,
                                         lambda msg, b=buffer: self._on_compressed(b, msg),
                                         qos_profile_sensor_data)
        self._joint_selector = JointSelector(self.config.state_joint_names)
        self.create_subscription(JointState, "joint_states", self._on_joint_state, qos_profile_sensor_data)
        self.create_subscription(String, "instruction", self._on_instruction, INSTRUCTION_QOS)

    def _on_image(self, buffer: LatestBuffer, msg: Image) -> None:
        try:
            height, width = image_shape(msg)
            filled = image_to_rgb(msg, buffer.spare((height, width, 3)))
        except ConversionError as exc:
            self._input_failed(buffer, exc)
            return
        buffer.commit(filled, stamp_to_ns(msg.header.stamp))

    def _on_compressed(self, buffer: LatestBuffer, msg: CompressedImage) -> None:
        try:
            filled = compressed_to_rgb(msg, buffer.spare())
        except ConversionError as exc:
            self._input_failed(buffer, exc)
            return
        buffer.commit(filled, stamp_to_ns(msg.header.stamp))

    def _on_joint_state(self, msg: JointState) -> None:
        buffer = self.inputs.joints
        try:
            size = len(self.config.state_joint_names) or len(msg.position)
            filled = self._joint_selector.positions(msg, buffer.spare((size,)))
        except ConversionError as exc:
            self._input_failed(buffer, exc)
            return
        buffer.commit(filled, stamp_to_ns(msg.header.stamp))

    def _on_instruction(self, msg: String) -> None:
        self.inputs.instruction.set(msg.data)
        self.get_logger().info(f"instruction: {msg.data!r}")

    def _input_failed(self, buffer: LatestBuffer, exc: ConversionError) -> None:
        buffer.fail(str(exc))
        self.get_logger().error(f"input '{buffer.name}': {exc}", throttle_duration_sec=5.0)

    # --- the model (called in the inference thread)

    def _load_policy(self) -> Policy:
        from pi05_ros.engine.policy import Policy

        config = self.config
        if config.cpu_threads:
            import torch

            torch.set_num_threads(config.cpu_threads)
        if config.use_demo_model:
            policy = Policy.demo(device=config.device, precision=config.precision, seed=config.seed)
        else:
            if not config.tokenizer:
                raise ConfigError(
                    "checkpoint is set but tokenizer is empty; set tokenizer:=/path/to/paligemma_tokenizer.model"
                )
            self.get_logger().info(f"loading checkpoint {config.checkpoint}")
            policy = Policy.load(
                config.checkpoint, config.tokenizer, norm_stats=config.norm_stats or None,
                config_preset=config.config_preset or None, device=config.device, precision=config.precision,
                action_dim=len(config.action_joint_names) or None, seed=config.seed,
                calibration_data=config.fp8_calibration_data or None, **self._convention_overrides(),
            )
            for line in policy.describe_conventions():
                self.get_logger().info(line)
        self._action_names = self._check_against_model(policy)
        self.model_facts = ModelFacts(policy.describe(), policy.device, policy.precision, policy.is_demo,
                                      tuple(policy.stage_names))
        level = self.get_logger().warning if policy.is_demo else self.get_logger().info
        level(f"model ready: {policy.describe()}" + (f" -- {DEMO_BANNER}" if policy.is_demo else ""))
        return policy

    def _convention_overrides(self) -> dict[str, Any]:
        """The checkpoint-convention parameters (params.py), None where empty: the checkpoint's own apply."""
        overrides: dict[str, Any] = {}
        for name in ("prompt_format", "image_resize", "action_space", "action_space_mask"):
            try:
                value = self.get_parameter(name).value
            except ParameterUninitializedException:  # a list parameter left unset (no default value)
                value = None
            overrides[name] = (list(value) if isinstance(value, Sequence) and not isinstance(value, str)
                               else value) or None
        return overrides

    def _check_against_model(self, policy: Policy) -> list[str]:
        """Startup parameters that only the loaded model can check; returns the action column names."""
        config = self.config
        fed: dict[str, str] = {}
        for camera in config.cameras:
            slot = policy.slot_for(camera.slot)
            if slot is None:
                names = sorted(set(policy.camera_names) - set(policy.image_keys))
                also = f" (or the checkpoint's camera names {', '.join(names)})" if names else ""
                raise ConfigError(
                    f"camera.{camera.name}.slot is '{camera.slot}', which this model does not have; "
                    f"use one of {', '.join(policy.image_keys)}{also}"
                )
            if slot in fed:
                raise ConfigError(f"cameras '{fed[slot]}' and '{camera.name}' both feed model slot '{slot}'; give "
                                  "each camera its own slot")
            fed[slot] = camera.name
        if config.state_joint_names and len(config.state_joint_names) != policy.state_dim:
            raise ConfigError(
                f"state_joint_names lists {len(config.state_joint_names)} joints but the model's state has "
                f"{policy.state_dim} values; list exactly the joints the policy was trained with"
            )
        if config.action_joint_names:
            if len(config.action_joint_names) != policy.action_dof:
                raise ConfigError(
                    f"action_joint_names lists {len(config.action_joint_names)} names but the model returns "
                    f"{policy.action_dof} action values; list one name per action column"
                )
            return list(config.action_joint_names)
        if len(config.state_joint_names) == policy.action_dof:
            return list(config.state_joint_names)
        return [f"action_{i}" for i in range(policy.action_dof)]

    # --- outputs

    def _publish_chunk(self, chunk: ActionChunk, observation: Observation, latency_s: float,
                       settings: RuntimeSettings) -> None:
        """Called by the inference thread; rclpy publishers are safe to use from it."""
        self._chunk_pub.publish(action_chunk_message(
            chunk.actions, stamp_ns=observation.stamp_ns, joint_names=self._action_names,
            action_dt=self.config.action_dt, denoise_steps=chunk.num_steps, latency_s=latency_s,
            sequence=self._sequence, demo_model=bool(self.model_facts and self.model_facts.is_demo),
            action_kinds=chunk.action_space.output_kinds if chunk.action_space else ()))
        self._sequence += 1
        if settings.publish_joint_trajectory:
            self._trajectory_pub.publish(
                joint_trajectory_message(chunk.actions, self._action_names, self.config.action_dt))

    def publish_diagnostics(self) -> None:
        trigger = self.config.trigger_camera
        status = build_status(
            f"{self.get_fully_qualified_name()}: policy", self.worker.status(), self.inputs.states(),
            self._runtime, self.model_facts, rate_mode=f"trigger:{trigger}" if trigger else "timer",
            demo_requested=self.config.use_demo_model,
        )
        self._diagnostics_pub.publish(build_array(status, self.get_clock().now().to_msg()))

    # --- run-time parameters

    def _validate_parameters(self, parameters: Sequence[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name not in DYNAMIC_PARAMETERS:
                continue
            reason = validate_runtime_value(parameter.name, parameter.value)
            if reason is not None:
                self.get_logger().warning(f"rejected {parameter.name}={parameter.value!r}: {reason}")
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: Sequence[Parameter]) -> None:
        changed = [p for p in parameters if p.name in DYNAMIC_PARAMETERS]
        if not changed:
            return
        self._runtime = updated_runtime(self._runtime, changed)
        self.worker.wake()
        for parameter in changed:
            self.get_logger().info(f"{parameter.name} = {parameter.value!r} from the next inference")

    # --- lifetime

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> bool:
        return self.worker.stop(STOP_TIMEOUT_S)


class _RosLogHandler(logging.Handler):
    """Sends the engine's Python `logging` records to the node's ROS logger (console and /rosout)."""

    def __init__(self, node: Node) -> None:
        super().__init__(logging.INFO)
        self._logger = node.get_logger().get_child("engine")

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            self._logger.error(message)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(message)
        else:
            self._logger.info(message)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the node until SIGINT/SIGTERM, then exit the process.
    Exit codes: 0 stopped, 1 model failed to load or does not fit the parameters, 2 bad parameters."""
    stop = init_ros(argv)  # a signal only sets `stop`; shutdown runs in order below
    try:
        node = PolicyNode()
    except ConfigError as exc:
        get_logger(NODE_NAME).fatal(f"bad parameters: {exc}")
        rclpy.try_shutdown()
        sys.exit(2)
    engine_log = logging.getLogger("pi05_ros")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(_RosLogHandler(node))

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="ros_executor", daemon=True)
    spinner.start()
    node.start()

    exit_code = 0
    while not stop.wait(0.05):
        if node.worker.failed:
            node.get_logger().fatal(f"cannot start: {node.worker.status().fatal_error}")
            node.publish_diagnostics()  # one last ERROR status for monitors
            exit_code = 1
            break
    if stop.is_set():
        node.get_logger().info("stopping")
    stopped = node.stop()
    if not stopped:
        node.get_logger().warning("an inference is still running; exiting without waiting for it")
    executor.shutdown(timeout_sec=0.2)
    node.destroy_node()
    rclpy.try_shutdown()  # also flushes and closes ROS logging
    # Everything is shut down. Skip the interpreter's teardown, so that no library destructor and no daemon
    # thread (an inference still running) can hold the exit past the promise to stop within a second.
    took = stop.seconds_since_signal()
    if took is not None:
        # CLOCK_MONOTONIC is one clock for every process on the machine: a supervisor can check the figure.
        print(f"[{NODE_NAME}] stopped {took:.3f} s after the signal (monotonic {time.monotonic():.6f})", flush=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    main()

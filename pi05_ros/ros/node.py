"""The `pi05_policy` node (executable `policy_node`): camera images + joint states + an instruction in,
action chunks, robot commands (joint trajectories or forward-controller command arrays) and /diagnostics out.

A managed (lifecycle) node: configure loads and warms up the model; activate starts inferring and commanding;
deactivate holds, stops commanding and keeps the model; cleanup frees it; shutdown from any state. With
`autostart` (default) it configures and activates itself; the launch file drives the transitions otherwise.

Threads: one SingleThreadedExecutor thread runs the subscription callbacks, the diagnostics timer, the parameter
and lifecycle services; callbacks only convert the newest message into a preallocated buffer. (rclpy's
MultiThreadedExecutor busy-spins while a callback waits for a pool thread, rclpy issue 1452: here it burned half
a core and, holding the GIL, stalled CPU inferences for up to 2.5 s: docs/benchmarks.md §16.) The inference
thread (worker.py) owns the engine and hands each chunk to the execution layer (pi05_ros/execution/), whose
control loop thread ticks at 1/action_dt. The node does no math: it wires the parts and builds the messages
(conversions.py).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import State
from rcl_interfaces.msg import SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, ShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray, String
from trajectory_msgs.msg import JointTrajectory

from pi05_ros.engine.errors import InputError
from pi05_ros.execution.blend import RTC, BlendSettings
from pi05_ros.execution.commander import (
    CHUNK,
    TRAJECTORY,
    VELOCITY_INTERFACE,
    ChunkCommander,
    ChunkTiming,
    PointCommand,
    Situation,
    StreamCommander,
    TrajectoryCommand,
)
from pi05_ros.execution.limits import JointLimit, JointLimits
from pi05_ros.execution.loop import ControlLoop
from pi05_ros.execution.plan import CommandColumns, ExecutionConfigError, command_columns, plan_chunk, seconds_to_ns
from pi05_ros.execution.rtc import LatencyEstimate, committed_actions, delay_actions
from pi05_ros.execution.urdf import limits_from_urdf
from pi05_ros.msg import ActionChunk as ActionChunkMsg
from pi05_ros.ros.conversions import (
    ConversionError,
    JointSelector,
    action_chunk_message,
    compressed_format,
    compressed_to_rgb,
    float64_array_message,
    image_shape,
    image_to_rgb,
    stamp_to_ns,
    trajectory_message,
)
from pi05_ros.ros.diagnostics import (
    DEMO_BANNER,
    CommandFacts,
    ModelFacts,
    build_array,
    build_status,
    gather_problems,
)
from pi05_ros.ros.input_rules import FrameBounds, compressed_size_before_decoding
from pi05_ros.ros.inputs import CameraBuffer, InputBuffers, LatestBuffer, StampRule
from pi05_ros.ros.memory import HeapTrimmer
from pi05_ros.ros.observation import (
    Observation,
    ObservationCollector,
    bad_input_problem,
    empty_instruction_problem,
)
from pi05_ros.ros.params import (
    DYNAMIC_PARAMETERS,
    ConfigError,
    NodeConfig,
    declare_joint_limits,
    declare_parameters,
    ignored_by_remote_backend,
    unused_joint_limit_overrides,
    unused_overrides,
    updated_runtime,
    validate_runtime_value,
)
from pi05_ros.ros.problem_log import ProblemLog
from pi05_ros.ros.problems import Level, Problem, ProblemCode, quoted_short, shorten
from pi05_ros.ros.process import init_ros
from pi05_ros.ros.settings import RuntimeSettings
from pi05_ros.ros.worker import NO_CLOCK_MESSAGE, InferenceWorker, Phase, WorkerStatus
from pi05_ros.signals import StopEvent

if TYPE_CHECKING:
    from pi05_ros.engine.policy import Policy
    from pi05_ros.engine.runner import ActionChunk

NODE_NAME = "pi05_policy"
DIAGNOSTICS_PERIOD_S = 1.0
STOP_TIMEOUT_S = 0.5  # how long shutdown waits for an inference in flight (the whole stop must take < 1 s)
INSTRUCTION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Streamed commands: reliable like the controllers' SystemDefaultsQoS subscriptions, but only the newest is kept
# for a slow reader (an old command has no use once the next tick has published).
STREAM_COMMAND_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
COMMANDS_OFF_DEMO = ("commands off: the demo model never commands a robot (allow_demo_commands:=true publishes them, "
                     "only for a synthetic loop)")
_OK, _FAIL = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
LOG_TEXT_LIMIT = 500  # characters of an instruction or an engine message in one log line


def _unexpected(doing: str, exc: Exception) -> str:
    return (f"{doing} failed: {type(exc).__name__}: {shorten(str(exc), 300)}; the message is malformed in a way "
            "this node does not name yet (please report it)")


class PolicyNode(LifecycleNode):
    def __init__(self, stop_event: StopEvent | None = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        self.config: NodeConfig = declare_parameters(self)  # raises ConfigError
        self._runtime: RuntimeSettings = self.config.runtime
        self._exec = self.config.execution
        # Parameter callbacks only after declaring: declaration itself runs them.
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._abort = stop_event if stop_event is not None else StopEvent()  # set: stop configuring
        self._transition_lock = threading.RLock()  # remote (service) and local (trigger_*) transitions
        self._guard_change_state()

        self.model_facts: ModelFacts | None = None
        self._action_names: list[str] = []
        self._sequence = 0
        self._dt_ns = seconds_to_ns(self.config.action_dt)

        stamp_rule = StampRule(seconds_to_ns(self._exec.stamp_future_tolerance_s),
                               seconds_to_ns(self.config.max_input_age_s))
        self.inputs = InputBuffers([camera.name for camera in self.config.cameras], clock_ns=self.now_ns,
                                   stamp_rule=stamp_rule)
        # Inputs well-formed but wrong (issue 11): frame sizes per camera, joint values; problems logged once.
        self._frame_bounds = {camera.name: FrameBounds(camera.name, camera.max_width, camera.max_height)
                              for camera in self.config.cameras}
        self._problem_log = ProblemLog(self._write_problem_line)
        self._heap_trimmer = HeapTrimmer()
        self._freshness = ObservationCollector(self.inputs, self.config.cameras, self.config.max_input_age_s)
        self.worker: InferenceWorker | None = None
        self._columns: CommandColumns | None = None
        self._commander: ChunkCommander | StreamCommander | None = None
        self._loop: ControlLoop | None = None
        self._active = False
        self._configure_error: str | None = None
        self._command_lock = threading.Lock()  # a decision and its publication are one step
        self._latency = LatencyEstimate()  # blend rtc: the delay estimate in actions comes from it
        self._rtc_last: tuple[int, int] | None = None  # (delay, overlap) of the last RTC request
        self._logged_state = ""
        self._chunk_pub: Any = None
        self._trajectory_pub: Any = None
        self._command_pub: Any = None

        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._subscribe_inputs()
        # On the steady clock: a sim clock that stands still (or has not started) must not silence /diagnostics.
        self.create_timer(DIAGNOSTICS_PERIOD_S, self.publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME))
        unused = unused_overrides(self)
        if unused:
            self.get_logger().warning(
                f"ignored startup parameter(s) that {NODE_NAME} does not have: {shorten(', '.join(unused), 800)} "
                "(a typo, a camera.<name>.* for a camera not in `cameras`, or another node's entry in a shared "
                "params file)")
        ignored = ignored_by_remote_backend(self)
        if ignored:
            self.get_logger().warning(
                f"policy_backend is remote, so these local-model parameter(s) have no effect: {', '.join(ignored)}; "
                "the policy server's model, conventions and noise apply (set them on pi05-serve, docs/serving.md)")

        if self.config.use_demo_model:
            why = "demo:=true" if self.config.demo else "no checkpoint parameter is set"
            self.get_logger().warning(
                f"{DEMO_BANNER}: {why}, so the built-in random-weight model runs. "
                "Set checkpoint:=... and tokenizer:=... to run a real policy."
                + ("" if self._exec.allow_demo_commands else " It publishes no robot commands.")
            )

    def now_ns(self) -> int:
        """The ROS clock (sim time with use_sim_time), in nanoseconds."""
        return self.get_clock().now().nanoseconds

    @property
    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    # --- inputs

    def _subscribe_inputs(self) -> None:
        for camera in self.config.cameras:
            buffer = self.inputs.cameras[camera.name]
            bounds, topic = self._frame_bounds[camera.name], camera.topic
            if camera.transport == "raw":
                self.create_subscription(
                    Image, topic, lambda msg, b=buffer, f=bounds, t=topic: self._on_image(b, f, t, msg),
                    qos_profile_sensor_data)
            else:
                self.create_subscription(
                    CompressedImage, topic, lambda msg, b=buffer, f=bounds, t=topic: self._on_compressed(b, f, t, msg),
                    qos_profile_sensor_data)
        self._joint_selector = JointSelector(self.config.state_joint_names, self.config.max_abs_joint_position)
        self.create_subscription(JointState, "joint_states", self._on_joint_state, qos_profile_sensor_data)
        self.create_subscription(String, "instruction", self._on_instruction, INSTRUCTION_QOS)

    def _on_image(self, buffer: CameraBuffer, bounds: FrameBounds, topic: str, msg: Image) -> None:
        try:
            height, width = image_shape(msg)
            bounds.check(width, height)  # before any copy: a huge frame never reaches the buffers
            filled = image_to_rgb(msg, buffer.frame_buffer((height, width, 3)))
        except ConversionError as exc:
            self._input_failed(buffer, topic, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an exception out of a callback ends the executor thread
            self._input_failed(buffer, topic, _unexpected("converting the frame", exc))
            return
        self._commit_frame(buffer, topic, filled, msg)

    def _commit_frame(self, buffer: CameraBuffer, topic: str, frame: Any, msg: Image | CompressedImage) -> None:
        try:
            buffer.commit_frame(frame, stamp_to_ns(msg.header.stamp))  # resized for the model here when preparing
        except InputError as exc:
            self._input_failed(buffer, topic, str(exc))
        except Exception as exc:  # noqa: BLE001 - the resize runs PIL/torch in the callback; the executor must live
            self._input_failed(buffer, topic, f"resizing the frame for the model failed: {type(exc).__name__}: "
                               f"{shorten(str(exc), 300)}; set prepare_views:=in_inference to resize in the "
                               "inference instead")

    def _on_compressed(self, buffer: CameraBuffer, bounds: FrameBounds, topic: str, msg: CompressedImage) -> None:
        try:
            compressed_format(msg)  # a format this node reads (names the fix for compressedDepth and the like)
            compressed_size_before_decoding(msg.data, bounds)  # a huge frame is refused before decoding
            filled = compressed_to_rgb(msg, buffer.frame_buffer())
            bounds.check(filled.shape[1], filled.shape[0])
        except ConversionError as exc:
            self._input_failed(buffer, topic, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an exception out of a callback ends the executor thread
            self._input_failed(buffer, topic, _unexpected("decoding the frame", exc))
            return
        self._commit_frame(buffer, topic, filled, msg)

    def _on_joint_state(self, msg: JointState) -> None:
        buffer = self.inputs.joints
        try:
            size = len(self.config.state_joint_names) or len(msg.position)
            filled = self._joint_selector.positions(msg, buffer.spare((size,)))
        except ConversionError as exc:
            self._input_failed(buffer, "joint_states", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an exception out of a callback ends the executor thread
            self._input_failed(buffer, "joint_states", _unexpected("reading the joint state", exc))
            return
        buffer.commit(filled, stamp_to_ns(msg.header.stamp))

    def _on_instruction(self, msg: String) -> None:
        text = msg.data
        self.inputs.instruction.set(text)
        self.get_logger().info(f"instruction: {quoted_short(text, LOG_TEXT_LIMIT)}")
        if not text.strip():
            self._problem_log.seen((empty_instruction_problem(self.inputs.instruction.name, text),))

    def _input_failed(self, buffer: LatestBuffer, topic: str, reason: str) -> None:
        buffer.fail(reason)
        # Logged when this input's problem starts (and when it clears), whatever other inputs do.
        self._problem_log.seen((bad_input_problem(topic, buffer.name, reason),))

    def _write_problem_line(self, level: Level, text: str) -> None:
        logger = self.get_logger()
        if level is Level.ERROR:
            logger.error(text)
        elif level is Level.WARN:
            logger.warning(text)
        else:
            logger.info(text)

    # --- lifecycle

    def _guard_change_state(self) -> None:
        """rclpy 7.1.6 raises inside the change_state service when the requested transition does not exist from
        the current state (ros2/rclpy#1209, fixed upstream after this release): the error escapes the executor
        and the node stops serving. The guard answers success=false with a WARN instead, and serialises remote
        transitions with local ones (autostart, the signal handler's shutdown)."""
        service = self._service_change_state
        original = service.callback

        def guarded(request: Any, response: Any) -> Any:
            # This runs in the executor thread: waiting here for a transition of another thread (autostart's
            # configure loads the model for seconds to minutes) would stop /diagnostics and every subscription.
            if not self._transition_lock.acquire(blocking=False):
                self.get_logger().warning(
                    f"rejected lifecycle transition {request.transition.label or request.transition.id!r}: another "
                    f"transition is in progress (state '{self.lifecycle_state}', e.g. autostart loading the "
                    "model); request it again when that one has ended")
                response.success = False
                return response
            try:
                available = {tid: label for tid, label, *_ in self._state_machine.available_transitions}
                wanted = request.transition.id
                if request.transition.label:
                    wanted = next((t for t, label in available.items() if label == request.transition.label), -1)
                if wanted not in available:
                    self.get_logger().warning(
                        f"rejected lifecycle transition {request.transition.label or request.transition.id!r} in "
                        f"state '{self.lifecycle_state}'; available: {', '.join(sorted(available.values()))}")
                    response.success = False
                    return response
                return original(request, response)
            finally:
                self._transition_lock.release()

        service.callback = guarded

    def destroy_node(self) -> None:
        """Destroy the node and its lifecycle state machine: rclpy 7.1.6's LifecycleNode leaves the state machine,
        which holds the node's handle, to the garbage collector, so after os._exit the node would stay in peers'
        graphs for the ~20 s DDS lease."""
        super().destroy_node()
        self._state_machine.destroy_when_not_in_use()

    def autostart(self) -> str | None:
        """configure + activate from this (the main) thread; None when active, else why not."""
        with self._transition_lock:
            if self.trigger_configure() != _OK:
                return self._configure_error or "configure failed"
            if self._abort.is_set():  # a signal while configuring: do not start commanding now
                return "stopped before activating"
            if self.trigger_activate() != _OK:
                return "activate failed"
        return None

    def shut_down(self) -> None:
        """The shutdown transition from whatever primary state the node is in (signal or end of main)."""
        with self._transition_lock:
            if self._state_machine.current_state[0] in (State.PRIMARY_STATE_UNCONFIGURED,
                                                         State.PRIMARY_STATE_INACTIVE,
                                                         State.PRIMARY_STATE_ACTIVE):
                self.trigger_shutdown()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._configure_error = None
        try:
            worker = InferenceWorker(
                self._load_policy, self.inputs, self.config.cameras, lambda: self._runtime, self._publish_chunk,
                max_input_age_s=self.config.max_input_age_s, trigger_camera=self.config.trigger_camera,
                warmup=self.config.warmup, clock_ns=self.now_ns, guidance=self._rtc_request,
                on_problems=self._problem_log.seen,
            )
            self.worker = worker
            worker.start()
            while not worker.ready.wait(0.05):
                if self._abort.is_set():
                    self._release(wait_s=0.0)
                    return _FAIL
            if worker.failed:
                return self._configure_failed(worker.status().fatal_error or "the model failed to load")
            assert worker.policy is not None
            self._setup_execution(worker.policy)
            self._create_outputs()
        except (ConfigError, ExecutionConfigError, ValueError) as exc:
            return self._configure_failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it without a word
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            return self._configure_failed(f"{type(exc).__name__}: {exc}")
        self.get_logger().info(
            f"configured: execution {self._exec.execution}, commands {self._exec.command_interface} for "
            f"{list(self._columns.names) if self._columns else []}, on_stale {self._exec.on_stale}")
        return _OK

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers
        assert self.worker is not None
        with self._command_lock:
            if self._commander is not None:  # no command from before (the robot may have moved while inactive),
                self._commander.reactivate(self.now_ns())  # except a braking hold JTC still runs (commander.py)
        self._active = True
        self.worker.set_active(True)
        self._prepare_views_with(self.worker.policy)  # while inactive no inference uses the frames
        self._loop = ControlLoop(self.now_ns, self._dt_ns, self._on_control_tick)
        self._loop.start()
        self.get_logger().info("active: inferring" + ("" if self._commands_off() else " and commanding"))
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return _OK

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if state.label == "active":
            self._deactivate()
            super().on_deactivate(state)
        self._release()
        return _OK

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release(wait_s=0.0)
        return _OK  # back to unconfigured

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self._configure_error = message
        self.get_logger().error(f"configure failed: {message}")
        self._release(wait_s=0.0)
        return _FAIL

    def _deactivate(self) -> None:
        """Stop commanding: no tick, no inference; one hold (whatever on_stale says) while publishers still work."""
        # The control loop first: a tick that saw the node inactive would take commanding as paused and forget
        # what was commanded, and the hold below would have nowhere to hold.
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        with self._command_lock:
            self._active = False
        self._prepare_views_with(None)
        if self.worker is not None:
            self.worker.set_active(False)
        with self._command_lock:
            commander = self._commander
            trajectory_off = (self._exec.command_interface == TRAJECTORY
                              and not self._runtime.publish_joint_trajectory)
            if commander is None or self._commands_off() or trajectory_off:
                return  # nothing was commanded (something else may drive the robot): nothing to hold
            now = self.now_ns()
            situation = Situation(now, True, None, self._measured())
            if isinstance(commander, ChunkCommander):
                self._publish_trajectory(commander.hold_now(situation))
            else:
                self._publish_point(commander.hold_now(now, situation))
            commander.set_idle()
            self._logged_state = ""  # the next activation logs its first state again
        self.get_logger().info("inactive: held, not commanding (the model stays loaded)")

    def _release(self, wait_s: float = STOP_TIMEOUT_S) -> None:
        """Free what configure made: the worker and its model, the commander, the output publishers."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self._prepare_views_with(None)
        worker, self.worker = self.worker, None
        if worker is not None:
            if not worker.stop(wait_s):
                self.get_logger().warning("an inference is still running; its model is freed when it ends")
            close = getattr(worker.policy, "close", None)  # a remote policy's connection
            if close is not None:
                close()
            worker.policy = None
        self.model_facts = None  # the freed model's facts are not shown beside "unconfigured"
        self._latency, self._rtc_last = LatencyEstimate(), None
        with self._command_lock:
            self._commander = None
            self._columns = None
            for publisher in (self._chunk_pub, self._trajectory_pub, self._command_pub):
                if publisher is not None:
                    self.destroy_lifecycle_publisher(publisher)
            self._chunk_pub = self._trajectory_pub = self._command_pub = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _setup_execution(self, policy: Policy) -> None:
        """The commanded joints, their limits and the commander for the loaded model. Raises ConfigError or
        ExecutionConfigError naming the cause and the fix."""
        ex = self._exec
        space = policy.action_space
        state_values = len(self.config.state_joint_names) or policy.state_dim  # what the observations carry
        columns = command_columns(self._action_names, space.output_kinds, state_values, ex.command_joint_names,
                                  space.state_index, interface=ex.command_interface)
        from_urdf = limits_from_urdf(ex.robot_description, columns.names) if ex.robot_description else {}
        overrides = declare_joint_limits(self, columns.names)
        merged = {name: from_urdf.get(name, JointLimit()).merged(JointLimit(**overrides.get(name, {})))
                  for name in columns.names}
        try:
            limits = JointLimits.of(columns.names, merged)
        except ValueError as exc:
            raise ConfigError(f"joint limits: {exc}") from exc
        max_age_ns = seconds_to_ns(self.config.max_input_age_s)
        if ex.execution == CHUNK:
            commander: ChunkCommander | StreamCommander = ChunkCommander(
                columns.names, self._dt_ns, max_input_age_ns=max_age_ns, on_stale=ex.on_stale, limits=limits,
                command_margin_ns=seconds_to_ns(ex.command_margin_s))
        else:
            commander = StreamCommander(columns.names, self._dt_ns, max_input_age_ns=max_age_ns, on_stale=ex.on_stale,
                                        limits=limits, interface=ex.command_interface,
                                        blend=_blend_settings(self._runtime))
        with self._command_lock:
            self._columns, self._commander = columns, commander
        described = {name: limits.limit(name) for name in columns.names}
        self.get_logger().info(f"joint limits: {described}" if limits.any else "no joint limits set")
        unused = unused_joint_limit_overrides(self)
        if unused:
            self.get_logger().warning(
                f"ignored joint_limits parameter(s) of joints that are not command joints {list(columns.names)}: "
                f"{shorten(', '.join(unused), 800)}")

    def _create_outputs(self) -> None:
        self._chunk_pub = self.create_lifecycle_publisher(ActionChunkMsg, "action_chunk", 10)
        stream = self._exec.execution != CHUNK
        if self._exec.command_interface == TRAJECTORY:
            self._trajectory_pub = self.create_lifecycle_publisher(JointTrajectory, "joint_trajectory",
                                                                   STREAM_COMMAND_QOS if stream else 10)
        else:
            self._command_pub = self.create_lifecycle_publisher(Float64MultiArray, "commands", STREAM_COMMAND_QOS)

    # --- the model (called in the inference thread)

    def _prepare_views_with(self, policy: Policy | None) -> None:
        """Cameras resize their frames for `policy` as they arrive (`prepare_views`), or store them as they come
        (None; a remote policy, whose server resizes)."""
        on_arrival = policy is not None and self.config.views_on_arrival(policy.device)
        preparer = getattr(policy, "prepare_view", None) if on_arrival else None
        for buffer in self.inputs.cameras.values():
            buffer.set_preparer(None if preparer is None else
                                lambda frame, name=buffer.name: preparer(frame, name))

    def _load_policy(self) -> Policy:
        from pi05_ros.engine.policy import Policy

        config = self.config
        if config.cpu_threads and config.policy_backend != "remote":
            import torch

            torch.set_num_threads(config.cpu_threads)
        if config.policy_backend == "remote":
            from pi05_ros.serve.client import RemotePolicy

            self.get_logger().info(f"policy server {config.policy_server_url}")
            policy = RemotePolicy(config.policy_server_url, timeout_s=config.policy_server_timeout_s)
        elif config.use_demo_model:
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
        for name in ("prompt_format", "image_resize", "joint_convention", "action_space", "action_space_mask"):
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
        if config.state_joint_names and not (policy.state_dim <= len(config.state_joint_names)
                                             <= policy.max_state_values):
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

    # --- outputs and commands

    def _commands_off(self) -> str | None:
        """Why no command may be published at all (not a stop: there is nothing to hold)."""
        is_demo = self.model_facts.is_demo if self.model_facts is not None else self.config.use_demo_model
        if is_demo and not self._exec.allow_demo_commands:
            return COMMANDS_OFF_DEMO
        return None

    def _measured(self) -> Any:
        columns = self._columns
        return None if columns is None else columns.measured(self.inputs.joints.latest_copy())

    def _situation(self, now_ns: int) -> Situation:
        # the settings of now, not of an inference's start: commanding turned off while an inference ran (the
        # controller handed to another source) must keep that inference's chunk off the robot
        settings = self._runtime
        commanding = (self._active and self._commands_off() is None
                      and (self._exec.command_interface != TRAJECTORY or settings.publish_joint_trajectory))
        reason: str | None = None
        worker = self.worker
        if now_ns <= 0:
            reason = NO_CLOCK_MESSAGE
        elif worker is None or worker.policy is None:
            reason = "the model is not loaded"
        else:
            reason = worker.last_failure()
            if reason is None:
                problems = self._freshness.freshness_problems(now_ns)
                reason = problems[0].message if problems else None
        return Situation(now_ns, commanding, reason, self._measured())

    def _publish_chunk(self, chunk: ActionChunk, observation: Observation, latency_s: float, started_ns: int,
                       elapsed_s: float) -> None:
        """Called by the inference thread; rclpy publishers are safe to use from it."""
        # RTC's delay estimate: the tick's start to its chunk's publication in the queue's own time (collecting the
        # observation included): on the ROS clock under use_sim_time (the simulation's rate, not the wall's), else
        # on a steady clock, which a step of the system clock does not move. (A chunk whose inference spanned a
        # deactivation comes here only if the node is active again; its time is that inference's own.)
        sim = self.get_clock().ros_time_is_active
        self._latency.add(max(self.now_ns() - started_ns, 0) / 1e9 if sim else elapsed_s)
        with self._command_lock:
            if not self._active:  # deactivated (its hold sent) while this inference ran: nothing more goes out
                return
            if self._chunk_pub is not None:
                self._chunk_pub.publish(action_chunk_message(
                    chunk.actions, stamp_ns=observation.stamp_ns, joint_names=self._action_names,
                    action_dt=self.config.action_dt, denoise_steps=chunk.num_steps, latency_s=latency_s,
                    sequence=self._sequence, demo_model=bool(self.model_facts and self.model_facts.is_demo),
                    action_kinds=chunk.action_space.output_kinds if chunk.action_space else ()))
            sequence = self._sequence
            self._sequence += 1
            commander, columns = self._commander, self._columns
            if commander is None or columns is None:
                return
            plan = plan_chunk(chunk.actions, chunk.state, columns, t_obs_ns=observation.stamp_ns,
                              dt_ns=self._dt_ns, sequence=sequence)
            situation = self._situation(self.now_ns())
            timing = ChunkTiming(started_ns, latency_s)
            if isinstance(commander, ChunkCommander):
                self._publish_trajectory(commander.on_chunk(plan, situation, timing))
            else:
                commander.on_chunk(plan, situation, timing)

    def _on_control_tick(self, tick_ns: int) -> None:
        """Called by the control loop at every period of the ROS clock."""
        with self._command_lock:
            commander = self._commander
            if commander is None:
                return
            situation = self._situation(self.now_ns())
            if isinstance(commander, ChunkCommander):
                self._publish_trajectory(commander.on_tick(situation))
            else:
                self._publish_point(commander.on_tick(tick_ns, situation))
            state, reason = commander.stats.state, commander.stats.reason
        # One line when the state changes; the reason's own text (a growing age) may change every tick, and the
        # problem behind it is logged by the problem log.
        if state != self._logged_state:
            self._logged_state = state
            if state in ("holding", "stopped"):
                self.get_logger().warning(
                    f"commands {'hold' if state == 'holding' else 'stopped'}: {shorten(reason or '', LOG_TEXT_LIMIT)}")
            elif state == "commanding":
                self.get_logger().info("commanding")

    def _publish_trajectory(self, command: TrajectoryCommand | None) -> None:
        if command is not None and self._trajectory_pub is not None:
            self._trajectory_pub.publish(trajectory_message(
                self._commander_joints(), command.stamp_ns, command.times_from_start_ns, command.positions))

    def _publish_point(self, command: PointCommand | None) -> None:
        if command is None:
            return
        if self._trajectory_pub is not None:
            self._trajectory_pub.publish(trajectory_message(
                self._commander_joints(), command.tick_ns, (command.target_ns - command.tick_ns,),
                command.positions[None, :]))
        elif self._command_pub is not None:
            values = command.velocities if self._exec.command_interface == VELOCITY_INTERFACE else command.positions
            self._command_pub.publish(float64_array_message(values))

    def _commander_joints(self) -> tuple[str, ...]:
        return self._columns.names if self._columns is not None else ()

    def _rtc_request(self, observation: Observation, settings: RuntimeSettings, started_ns: int) -> Any:
        """blend rtc in stream mode: the queued actions the new chunk must agree with, and how many of them run
        before it can arrive (execution/rtc.py); None otherwise (plain inference)."""
        commander = self._commander
        if settings.blend != RTC or settings.rtc_beta <= 0 or not isinstance(commander, StreamCommander):
            return None
        from pi05_ros.engine.rtc import RtcRequest

        worker = self.worker
        horizon = worker.policy.action_horizon if worker is not None and worker.policy is not None else 0
        start, rows = committed_actions(commander.queue.pending(0), observation.stamp_ns, self._dt_ns, horizon)
        if settings.rtc_overlap:
            rows = rows[: settings.rtc_overlap]
        if not len(rows):
            return None  # nothing queued yet: the first chunk is plain
        arrival_ns = started_ns + int((self._latency.value() or 0.0) * 1e9)  # the estimate counts from the tick's start
        delay = delay_actions(observation.stamp_ns, commander.queue.next_target(arrival_ns), self._dt_ns)
        self._rtc_last = (delay, len(rows))
        return RtcRequest(rows, delay=delay, beta=settings.rtc_beta, schedule=settings.rtc_schedule, start=start)

    def publish_diagnostics(self) -> None:
        trigger = self.config.trigger_camera
        worker, commander, loop = self.worker, self._commander, self._loop
        execution = commander.status() if commander is not None else None
        rtc = None
        if self._runtime.blend == RTC and isinstance(commander, StreamCommander):
            delay, overlap = self._rtc_last or (0, 0)
            rtc = (delay, overlap, self._latency.value())
        facts = CommandFacts(self.lifecycle_state, execution, loop.stats() if loop is not None else None,
                             self._commands_off(), self._configure_error, rtc)
        worker_status = worker.report_status() if worker is not None else WorkerStatus.without_worker()
        inputs = self.inputs.states()
        rate_mode = f"trigger:{trigger}" if trigger else "timer"
        # In trigger mode a quiet trigger camera makes no tick, so nothing would see it (or another input) go stale.
        # A refused input is named as its callback named it (by topic: 'front/compressed'), also with no tick.
        current = self._freshness.freshness_problems(self.now_ns())
        quiet: tuple[Problem, ...] = tuple(
            p for p in current
            if p.code is ProblemCode.BAD_INPUT or (trigger and self._active and worker_status.phase is Phase.RUNNING))
        # An empty instruction is refused whether or not a tick looks at it (inactive, loading): named until a
        # non-empty one arrives, not logged as cleared at once
        text = self.inputs.instruction.get()
        if text is not None and not text.strip():
            quiet = (*quiet, empty_instruction_problem(self.inputs.instruction.name, text))
        problems = gather_problems(worker_status, inputs, self._runtime, self.model_facts, rate_mode=rate_mode,
                                   commands=facts, input_problems=quiet)
        status = build_status(
            f"{self.get_fully_qualified_name()}: policy", worker_status, inputs, self._runtime, self.model_facts,
            rate_mode=rate_mode, demo_requested=self.config.use_demo_model, commands=facts, problems=problems,
        )
        self._diagnostics_pub.publish(build_array(status, self.get_clock().now().to_msg()))
        self._problem_log.seen(problems)
        self._problem_log.sweep()
        self._heap_trimmer.check(self.inputs.held_bytes())  # after huge frames: memory back to the OS

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
        commander = self._commander
        if isinstance(commander, StreamCommander):
            commander.set_blend(_blend_settings(self._runtime))
        if self.worker is not None:
            self.worker.wake()
        for parameter in changed:
            when = "from the next chunk merged" if parameter.name in BLEND_PARAMETERS else "from the next inference"
            self.get_logger().info(f"{parameter.name} = {parameter.value!r} {when}")


# The stream hand-over's parameters: used when a chunk is merged into the queue, so a change applies to the next
# chunk merged (possibly one inferred before the change), not only to the next inference's.
BLEND_PARAMETERS = ("blend", "crossfade_actions", "weighted_average_new_weight", "temporal_ensemble_decay")


def _blend_settings(runtime: RuntimeSettings) -> BlendSettings:
    return BlendSettings(runtime.blend, runtime.crossfade_actions, runtime.weighted_average_new_weight,
                         runtime.temporal_ensemble_decay)


_TRACEBACK_FORMATTER = logging.Formatter()


class _RosLogHandler(logging.Handler):
    """Sends Python `logging` records (the engine's, Python warnings) to the node's ROS logger (console and
    /rosout), under a child logger (`<node>.engine`, `<node>.warnings`)."""

    def __init__(self, node: Node, child: str = "engine") -> None:
        super().__init__(logging.INFO)
        self._logger = node.get_logger().get_child(child)

    def emit(self, record: logging.LogRecord) -> None:
        # The message shortened (an engine warning may quote a 100,000-character prompt), a traceback in full.
        message = shorten(record.getMessage(), LOG_TEXT_LIMIT)
        if record.exc_info:
            message += "\n" + _TRACEBACK_FORMATTER.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            self._logger.error(message)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(message)
        else:
            self._logger.info(message)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the node until SIGINT/SIGTERM (or a remote shutdown transition), then exit the process.
    Exit codes: 0 stopped, 1 model failed to load or does not fit the parameters (autostart), 2 bad parameters."""
    stop = init_ros(argv, dds_profile=True)  # a signal only sets `stop`; shutdown runs in order below
    try:
        node = PolicyNode(stop_event=stop)
    except ConfigError as exc:
        get_logger(NODE_NAME).fatal(f"bad parameters: {exc}")
        rclpy.try_shutdown()
        sys.exit(2)
    profile = os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
    node.get_logger().info(f"Fast DDS profile: {profile or 'none (rmw defaults)'}")
    engine_log = logging.getLogger("pi05_ros")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(_RosLogHandler(node))
    # Python warnings reach the node's log (console and /rosout) too, each as Python shows it (once per place):
    # e.g. rclpy's "failed to send response (timeout)" when a parameter reply could not be delivered.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.addHandler(_RosLogHandler(node, "warnings"))
    warnings_log.propagate = False

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinning = threading.Event()
    spinning.set()
    wake_executor = node.create_guard_condition(lambda: None)  # ends the executor's current wait at shutdown

    def spin() -> None:
        # No timeout: a timeout makes rclpy create a timer on the context for every wait, which can outlive the
        # wait and hold the context, and with it the DDS participant, past the process's exit.
        while spinning.is_set():
            try:
                executor.spin_once()
            except (ExternalShutdownException, ShutdownException):
                break
            except Exception as exc:  # noqa: BLE001 - rclpy re-raises a callback's exception; one bad message
                # must not end every subscription, /diagnostics and the lifecycle services
                node.get_logger().error(f"a callback failed: {type(exc).__name__}: {shorten(str(exc), 300)}")

    spinner = threading.Thread(target=spin, name="ros_executor", daemon=True)
    spinner.start()

    exit_code = 0
    if node.config.execution.autostart:
        # From this thread, so the executor keeps serving parameters and /diagnostics while the model loads.
        error = node.autostart()
        if error is not None and not stop.is_set():
            node.get_logger().fatal(f"cannot start: {error}")
            node.publish_diagnostics()  # one last ERROR status for monitors
            exit_code = 1
    while exit_code == 0 and not stop.wait(0.05):
        if node.lifecycle_state == "finalized":  # shut down through the lifecycle service
            break
    if stop.is_set():
        node.get_logger().info("stopping")
    node.shut_down()  # deactivate (one hold) and free the model, whatever the state
    # The executor thread must have left before the node is destroyed: destroy_node() only marks handles that
    # are still in use, and the process would then exit before DDS announced the node's departure, leaving it in
    # peers' graphs for the ~20 s DDS lease (measured: FACTS, issue 11 item 2). It must also have left before
    # executor.shutdown(): rclpy 7.1's shutdown drops the executor's guard condition without waiting for a spin in
    # progress, whose next callback then fails on it (AttributeError: 'NoneType' object has no attribute
    # 'trigger', seen in CI); so the thread stops spinning first, woken by a guard condition of the node.
    spinning.clear()
    wake_executor.trigger()
    spinner.join(0.5)
    if spinner.is_alive():  # a callback still running: leave the executor to the process's exit
        node.get_logger().warning("the executor thread was still in a callback 0.5 s after the stop")
    else:
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

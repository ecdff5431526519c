"""Every parameter of the `pi05_policy` node, declared in this one place with types, ranges and descriptions.

`declare_parameters(node)` declares them and returns the startup configuration; the parameters marked dynamic
change at run time (`ros2 param set`) and are validated here with a reason when rejected. config/pi05.yaml documents the
same names for users; test/ros/test_params.py checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
)
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterUninitializedException,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from pi05_ros.ros.input_rules import DEFAULT_MAX_IMAGE_SIDE, MAX_IMAGE_SIDE_LIMIT, MIN_IMAGE_SIDE
from pi05_ros.ros.settings import CameraConfig, ExecutionParams, RuntimeSettings

# Mirrors pi05_ros.engine.policy.MAX_DENOISE_STEPS (a test keeps them equal); not imported so that this module
# loads without torch.
MAX_DENOISE_STEPS = 100
MAX_RATE_HZ = 200.0
MIN_RATE_HZ = 0.1

CAMERA_TRANSPORTS = ("raw", "compressed")
# Default model slot of the camera inputs a user is most likely to have.
DEFAULT_CAMERA_SLOTS = {
    "base_image": "base_0_rgb",
    "wrist_image": "left_wrist_0_rgb",
    "left_wrist_image": "left_wrist_0_rgb",
    "right_wrist_image": "right_wrist_0_rgb",
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name, default (which fixes its type), description and limits."""

    name: str
    default: Any
    description: str
    type_: Parameter.Type
    dynamic: bool = False  # may change at run time; everything else is read-only after startup
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    constraints: str = ""
    choices: tuple[str, ...] = ()  # the only values a string parameter may take (checked at startup and run time)

    def descriptor(self) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(
            name=self.name,
            type=self.type_.value,
            description=self.description,
            additional_constraints=self.constraints,
            read_only=not self.dynamic,
        )
        if self.int_range is not None:
            descriptor.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range is not None:
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)
            ]
        if self.choices and not self.constraints:
            descriptor.additional_constraints = ", ".join(self.choices)
        return descriptor


_S, _B, _I, _F, _SA = (Parameter.Type.STRING, Parameter.Type.BOOL, Parameter.Type.INTEGER,
                       Parameter.Type.DOUBLE, Parameter.Type.STRING_ARRAY)

PARAMETERS: tuple[ParamSpec, ...] = (
    # --- the model
    ParamSpec("checkpoint", "", "openpi PyTorch checkpoint directory or LeRobot pi05 model.safetensors. "
              "Empty: run the built-in random-weight demo model (logged and shown on /diagnostics).", _S),
    ParamSpec("tokenizer", "", "PaliGemma SentencePiece model (paligemma_tokenizer.model); needed with a "
              "checkpoint.", _S),
    ParamSpec("norm_stats", "", "norm_stats.json path, or the asset id under <checkpoint>/assets/. Empty: the "
              "checkpoint's only assets/*/norm_stats.json.", _S),
    ParamSpec("config_preset", "", "The preset the checkpoint's config.json is laid over: pi05, pi05_droid, "
              "pi05_droid_joint_position, pi05_aloha, pi05_libero or tiny. Empty: pi05 (tiny for tiny checkpoints).",
              _S, constraints="'', pi05, pi05_droid, pi05_droid_joint_position, pi05_aloha, pi05_libero, tiny"),
    ParamSpec("demo", False, "Run the built-in random-weight model even if a checkpoint is set (tiny on CPU, "
              "full size on a GPU). Its actions are meaningless: never drive a robot with it.", _B),
    ParamSpec("device", "auto", "Torch device: auto (cuda if present), cpu, cuda or cuda:N.", _S),
    # --- policy server (issue 9): infer on a pi05-serve (or openpi-protocol) server instead of here
    ParamSpec("policy_backend", "local", "local: load the model in this node. remote: send each observation to the "
              "policy server at policy_server_url (pi05-serve; docs/serving.md); everything else runs as with "
              "local (timing, streaming, safety, diagnostics with network time as its own stage).", _S,
              choices=("local", "remote")),
    ParamSpec("policy_server_url", "ws://127.0.0.1:8000", "policy_backend remote: the server's websocket URL (its "
              "path picks the observation layout, e.g. ws://host:8000/pi05_ros).", _S),
    ParamSpec("policy_server_timeout_s", 5.0, "policy_backend remote: connect and reply timeout; a request past it "
              "fails that inference (commands hold) and the next one reconnects.", _F, float_range=(0.1, 600.0)),
    ParamSpec("precision", "auto", "Numeric precision: auto (fp32 on CPU; fp8 on GPUs with FP8 GEMMs, SM 8.9+; "
              "else bf16), fp32, bf16, fp8.", _S,
              constraints="auto, fp32, float32, bf16, bfloat16, fp8"),
    ParamSpec("fp8_calibration_data", "", "Folder of recorded observations (.npz, see engine/recordings.py) to "
              "calibrate FP8 scales on when none are saved beside the checkpoint. Empty: synthetic ones.", _S),
    ParamSpec("cpu_threads", 0, "Torch CPU threads for inference (torch.set_num_threads); 0 keeps torch's "
              "default (one per core). Set it lower when other nodes share the CPU.", _I, int_range=(0, 256)),
    ParamSpec("seed", 0, "Seed of the flow-matching noise (and of the demo model's random weights).", _I,
              int_range=(0, 2**31 - 1)),
    ParamSpec("warmup", 2, "Inferences on synthetic input after loading the model (first-call allocations, "
              "CUDA graphs), before the first real one.", _I, int_range=(0, 20)),
    ParamSpec("prepare_views", "auto", "Where camera frames are resized for the model: on_arrival (in each "
              "frame's callback, off the inference's critical path, but every frame is resized, also those no "
              "inference uses), in_inference (only the views an inference takes, on its thread), auto (on_arrival "
              "when the model runs on a GPU, whose inference leaves the CPU free; in_inference on a CPU, where the "
              "extra resizes slow the inference). policy_backend remote always sends frames as they came.", _S,
              choices=("auto", "on_arrival", "in_inference")),
    # --- the checkpoint's conventions (engine/conventions.py); empty: the checkpoint's own, pi05-info shows them
    ParamSpec("prompt_format", "", "How the prompt is written: pi05 (task + discretized state: openpi, LeRobot "
              ">= 0.5), pi05_padded (state zero-padded to max_state_dim: LeRobot <= 0.4), pi0 (no state: "
              "pi05_libero). Empty: what the checkpoint's files say.", _S, constraints="'', pi05, pi05_padded, pi0"),
    ParamSpec("image_resize", "", "Resize-with-pad of camera images: openpi_client (PIL bilinear), "
              "openpi_server (the same: openpi's ResizeImages calls it), lerobot (torch bilinear on floats). "
              "Empty: the family's own.", _S, constraints="'', openpi_client, openpi_server, lerobot"),
    ParamSpec("joint_convention", "", "The joint convention the checkpoint was trained in: none, or aloha_to_pi "
              "(openpi's ALOHA adapt_to_pi: joints 1, 2, 8, 9 flipped and the grippers converted, both ways). Empty: "
              "the preset's (pi05_aloha: aloha_to_pi).", _S, constraints="'', none, aloha_to_pi"),
    ParamSpec("action_space", "", "What the action columns mean: absolute, delta (added to the observed state), "
              "velocity, end_effector (not joint commands), or a comma-separated kind per column. Empty: the "
              "checkpoint's / preset's, else absolute.", _S),
    ParamSpec("action_space_mask", [], "Per action column, true = the action_space kind (default delta), false "
              "= absolute (openpi's make_bool_mask); shorter than the columns: the rest absolute. Empty: none.",
              Parameter.Type.BOOL_ARRAY),
    # --- run-time knobs
    ParamSpec("denoise_steps", 10, "Flow-matching Euler steps per inference (fewer: faster, coarser). "
              "Takes effect on the next inference.", _I, dynamic=True, int_range=(1, MAX_DENOISE_STEPS)),
    ParamSpec("rate_hz", 10.0, "Target inference rate when trigger_camera is empty. Takes effect on the next "
              "inference.", _F, dynamic=True, float_range=(MIN_RATE_HZ, MAX_RATE_HZ)),
    ParamSpec("default_instruction", "", "Task prompt used while no message has arrived on `instruction`. "
              "Takes effect on the next inference.", _S, dynamic=True),
    ParamSpec("publish_joint_trajectory", True, "Command the robot on `joint_trajectory` "
              "(trajectory_msgs/JointTrajectory: each chunk's trajectory, holds, stream ticks); false pauses every "
              "command there at once, a chunk whose inference is running included (the chunks still go out on "
              "`action_chunk`).", _B, dynamic=True),
    # --- timing of the actions
    ParamSpec("action_dt", 0.05, "Seconds between consecutive actions of a chunk (the rate the policy was "
              "trained at, e.g. 0.066 for 15 Hz DROID).", _F, float_range=(1e-4, 10.0)),
    ParamSpec("trigger_camera", "", "Run one inference on every new frame of this camera (one of `cameras`) "
              "instead of at rate_hz. Empty: run at rate_hz.", _S),
    ParamSpec("max_input_age_s", 0.5, "An input whose newest message arrived longer ago than this is stale: "
              "no inference runs and /diagnostics warns.", _F, float_range=(0.01, 3600.0)),
    # --- inputs and outputs
    ParamSpec("cameras", ["base_image", "wrist_image"], "Camera inputs; each name is also its (relative) "
              "topic. Per camera: camera.<name>.slot and camera.<name>.transport.", _SA),
    ParamSpec("state_joint_names", [], "Joints of joint_states that form the state, in the model's order. "
              "Empty: every position in the message's order.", _SA),
    ParamSpec("action_joint_names", [], "Names of the action columns (action_chunk.joint_names and "
              "joint_trajectory.joint_names). Empty: state_joint_names when the sizes match, else action_<i>.",
              _SA),
) + (
    # --- execution (issue 13): what reaches the robot (pi05_ros/execution/, docs/ros_node.md)
    ParamSpec("autostart", True, "Configure (load and warm up the model) and activate (start commanding) by "
              "itself at startup. false: stay unconfigured until a lifecycle manager or launch drives it.", _B),
    ParamSpec("allow_demo_commands", False, "Publish robot commands (joint_trajectory, commands) from the "
              "random-weight demo model. Only for synthetic loops such as scripts/demo.sh: never with a robot.", _B),
    ParamSpec("execution", "chunk", "chunk: each chunk as one stamped, bounded JointTrajectory for "
              "joint_trajectory_controller. stream: a control loop at 1/action_dt publishes one command per tick "
              "from a queue the chunks merge into (blend).", _S, choices=("chunk", "stream")),
    ParamSpec("command_interface", "trajectory", "What commands are: trajectory (trajectory_msgs/JointTrajectory "
              "on joint_trajectory, for JTC), position or velocity (std_msgs/Float64MultiArray on commands, for "
              "forward_command_controller; execution: stream only).", _S,
              choices=("trajectory", "position", "velocity")),
    ParamSpec("command_joint_names", [], "Joints the commands carry, in this order (forward_command_controller's "
              "`joints`); each an action column name. Empty: every action column in order.", _SA),
    ParamSpec("on_stale", "hold", "When inputs go stale or missing, an inference fails or the model is not "
              "loaded: hold (come to rest: at once at the last commanded position, or braking within "
              "joint_limits.<joint>.max_acceleration where set) or stop (publish nothing more; "
              "not allowed with command_interface velocity).", _S, choices=("hold", "stop")),
    ParamSpec("command_margin_s", 0.01, "Chunk mode: trajectory points due sooner than this after now are "
              "dropped (transport + one controller cycle), so JTC blends into the first point instead of jumping.",
              _F, float_range=(0.0, 1.0)),
    ParamSpec("stamp_future_tolerance_s", 0.05, "An input stamp up to this far ahead of its arrival is clamped to "
              "the arrival; further ahead it is untrusted (the arrival time is used, WARN).", _F,
              float_range=(0.0, 10.0)),
    ParamSpec("robot_description", "", "URDF (the string robot_state_publisher takes) to read the command "
              "joints' position and velocity limits from; joint_limits.<joint>.* parameters override it.", _S),
    ParamSpec("blend", "replace", "Stream mode hand-over of a new chunk: replace, crossfade, weighted_average, "
              "temporal_ensemble or rtc (real-time chunking: each chunk denoised to agree with the queued actions; "
              "docs/ros_node.md, which strategy when). Takes effect on the next chunk.", _S,
              dynamic=True, choices=("replace", "crossfade", "weighted_average", "temporal_ensemble", "rtc")),
    ParamSpec("crossfade_actions", 5, "blend crossfade: actions over which the new chunk fades in linearly.", _I,
              dynamic=True, int_range=(0, 1000)),
    ParamSpec("weighted_average_new_weight", 0.7, "blend weighted_average: weight of the new chunk's action (the "
              "queued one gets 1 - this; LeRobot's default 0.7).", _F, dynamic=True, float_range=(0.0, 1.0)),
    ParamSpec("temporal_ensemble_decay", 0.01, "blend temporal_ensemble: m in the weights exp(-m i), i = 0 the "
              "oldest prediction (ACT's 0.01; negative favours newer ones).", _F, dynamic=True,
              float_range=(-10.0, 10.0)),
    # --- real-time chunking (issue 8): blend rtc
    ParamSpec("rtc_beta", 5.0, "blend rtc: the guidance weight's clip beta (Kinetix's default 5; 0 = plain "
              "inference, merged as replace).", _F, dynamic=True, float_range=(0.0, 100.0)),
    ParamSpec("rtc_overlap", 0, "blend rtc: most queued actions the new chunk is made to agree with (the soft "
              "mask ends there); 0: every queued action it overlaps.", _I, dynamic=True, int_range=(0, 1000)),
    ParamSpec("rtc_schedule", "exp", "blend rtc: how the soft mask decays after the actions that run during the "
              "inference: exp, linear, ones (no decay) or zeros (only those).", _S, dynamic=True,
              choices=("exp", "linear", "ones", "zeros")),
) + (
    # --- input rules (issue 11): inputs well-formed but wrong (docs/ros_node.md, "Input rules")
    ParamSpec("max_abs_joint_position", 1.0e4, "A joint_states position further from 0 than this (or NaN, inf) is "
              "refused, naming the joint: the input is unusable until a good message, commands hold. Positions are "
              "rad or m.", _F, float_range=(1e-3, 1e12)),
)

LIMIT_FIELDS = ("min_position", "max_position", "max_velocity", "max_acceleration")


def joint_limit_parameters(joint: str) -> tuple[ParamSpec, ...]:
    """The per-joint limits, declared once the command joints are known (configure). NaN: not set here."""
    meaning = {"min_position": "lowest position", "max_position": "highest position",
               "max_velocity": "largest speed (per second)", "max_acceleration": "largest acceleration (per s^2)"}
    return tuple(ParamSpec(f"joint_limits.{joint}.{field}", float("nan"),
                           f"Limit of command joint '{joint}': its {meaning[field]}, in robot units. NaN (unset): "
                           "from robot_description, or none.", _F) for field in LIMIT_FIELDS)


def camera_parameters(camera: str) -> tuple[ParamSpec, ...]:
    """The per-camera parameters, declared once `cameras` is known."""
    return (
        ParamSpec(f"camera.{camera}.slot", DEFAULT_CAMERA_SLOTS.get(camera, ""),
                  f"Model image slot fed by camera input '{camera}' (base_0_rgb, left_wrist_0_rgb or "
                  "right_wrist_0_rgb for Pi0.5). Slots no camera feeds are masked.", _S),
        ParamSpec(f"camera.{camera}.transport", "raw",
                  f"'raw': sensor_msgs/Image on '{camera}' (rgb8, bgr8, rgba8, bgra8, mono8); 'compressed': "
                  f"sensor_msgs/CompressedImage (jpeg/png) on '{camera}/compressed'.", _S,
                  constraints="raw, compressed"),
        # --- input rules (issue 11): the largest frame, which bounds the camera's buffers
        ParamSpec(f"camera.{camera}.max_width", DEFAULT_MAX_IMAGE_SIDE,
                  f"Widest frame accepted on camera input '{camera}' (pixels); wider ones are refused before any "
                  "copy. With max_height it bounds the camera's three buffers (max_width*max_height*3 bytes each).",
                  _I, int_range=(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE_LIMIT)),
        ParamSpec(f"camera.{camera}.max_height", DEFAULT_MAX_IMAGE_SIDE,
                  f"Tallest frame accepted on camera input '{camera}' (pixels); see max_width.", _I,
                  int_range=(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE_LIMIT)),
    )


DYNAMIC_PARAMETERS: frozenset[str] = frozenset(spec.name for spec in PARAMETERS if spec.dynamic)
_SPECS_BY_NAME = {spec.name: spec for spec in PARAMETERS}


@dataclass(frozen=True)
class NodeConfig:
    """Startup configuration of the node (read-only parameters)."""

    checkpoint: str
    tokenizer: str
    norm_stats: str
    config_preset: str
    demo: bool
    device: str
    precision: str
    fp8_calibration_data: str
    cpu_threads: int
    seed: int
    warmup: int
    action_dt: float
    trigger_camera: str
    max_input_age_s: float
    cameras: tuple[CameraConfig, ...]
    state_joint_names: tuple[str, ...]
    action_joint_names: tuple[str, ...]
    runtime: RuntimeSettings  # the values at startup; the node keeps the current ones
    execution: ExecutionParams  # issue 13
    max_abs_joint_position: float = float("inf")  # issue 11: input rules
    policy_backend: str = "local"  # issue 9: local | remote (a policy server)
    policy_server_url: str = ""
    policy_server_timeout_s: float = 5.0
    prepare_views: str = "auto"  # where camera frames are resized for the model: auto | on_arrival | in_inference

    @property
    def use_demo_model(self) -> bool:
        return self.policy_backend == "local" and (self.demo or not self.checkpoint)

    def views_on_arrival(self, device: str) -> bool:
        """Whether cameras resize their frames as they arrive, for a local policy on `device` (`prepare_views`;
        docs/benchmarks.md §40: on a 2-core CPU resizing every frame slowed the inference more than it saved)."""
        if self.prepare_views == "auto":
            return device.startswith("cuda")
        return self.prepare_views == "on_arrival"


class ConfigError(ValueError):
    """A startup parameter combination the node cannot run with; str() names the cause and the fix."""


def declare_parameters(node: Node) -> NodeConfig:
    """Declare every parameter on `node` and return the startup configuration. Raises ConfigError."""
    values = {spec.name: _declare(node, spec) for spec in PARAMETERS}
    cameras = tuple(values["cameras"])
    if not cameras:
        raise ConfigError("parameter `cameras` is empty; list at least one camera input, e.g. [base_image]")
    if len(set(cameras)) != len(cameras):
        raise ConfigError(f"parameter `cameras` names a camera twice: {list(cameras)}")
    for name in ("state_joint_names", "action_joint_names"):
        joints = list(values[name])
        twice = sorted({j for j in joints if joints.count(j) > 1})
        if twice:
            raise ConfigError(f"parameter `{name}` names joint(s) {twice} more than once: {joints}; each joint "
                              "once, in the model's order")
    camera_configs = []
    for camera in cameras:
        slot_spec, transport_spec, max_width_spec, max_height_spec = camera_parameters(camera)
        slot, transport = _declare(node, slot_spec), _declare(node, transport_spec)
        max_width, max_height = _declare(node, max_width_spec), _declare(node, max_height_spec)
        if not slot:
            raise ConfigError(f"camera '{camera}' has no model slot; set camera.{camera}.slot (e.g. base_0_rgb)")
        if transport not in CAMERA_TRANSPORTS:
            raise ConfigError(
                f"camera.{camera}.transport is '{transport}'; use one of {', '.join(CAMERA_TRANSPORTS)}"
            )
        camera_configs.append(CameraConfig(camera, slot, transport, max_width, max_height))
    slots = [camera.slot for camera in camera_configs]
    if len(set(slots)) != len(slots):
        raise ConfigError(f"two cameras feed the same model slot ({slots}); give each camera its own slot")
    if values["trigger_camera"] and values["trigger_camera"] not in cameras:
        raise ConfigError(
            f"trigger_camera '{values['trigger_camera']}' is not one of cameras {list(cameras)}; "
            "name one of them or leave it empty to run at rate_hz"
        )
    for spec in PARAMETERS:
        if spec.choices and values[spec.name] not in spec.choices:
            raise ConfigError(f"{spec.name} is '{values[spec.name]}'; use one of {', '.join(spec.choices)}")
    runtime = RuntimeSettings(
        denoise_steps=values["denoise_steps"],
        rate_hz=values["rate_hz"],
        default_instruction=values["default_instruction"],
        publish_joint_trajectory=values["publish_joint_trajectory"],
        blend=values["blend"],
        crossfade_actions=values["crossfade_actions"],
        weighted_average_new_weight=values["weighted_average_new_weight"],
        temporal_ensemble_decay=values["temporal_ensemble_decay"],
        rtc_beta=values["rtc_beta"],
        rtc_overlap=values["rtc_overlap"],
        rtc_schedule=values["rtc_schedule"],
    )
    execution = _execution_params(values)
    return NodeConfig(
        checkpoint=values["checkpoint"], tokenizer=values["tokenizer"], norm_stats=values["norm_stats"],
        config_preset=values["config_preset"], demo=values["demo"], device=values["device"],
        precision=values["precision"], fp8_calibration_data=values["fp8_calibration_data"],
        cpu_threads=values["cpu_threads"], seed=values["seed"],
        warmup=values["warmup"],
        action_dt=values["action_dt"], trigger_camera=values["trigger_camera"],
        max_input_age_s=values["max_input_age_s"], cameras=tuple(camera_configs),
        state_joint_names=tuple(values["state_joint_names"]),
        action_joint_names=tuple(values["action_joint_names"]),
        runtime=runtime,
        execution=execution,
        max_abs_joint_position=values["max_abs_joint_position"],
        policy_backend=values["policy_backend"],
        policy_server_url=values["policy_server_url"],
        policy_server_timeout_s=values["policy_server_timeout_s"],
        prepare_views=values["prepare_views"],
    )


# --- execution (issue 13)


def _execution_params(values: dict[str, Any]) -> ExecutionParams:
    mode, interface, on_stale = values["execution"], values["command_interface"], values["on_stale"]
    if mode == "chunk" and interface != "trajectory":
        raise ConfigError(
            f"execution is 'chunk' (whole trajectories for joint_trajectory_controller) but command_interface is "
            f"'{interface}'; for forward_command_controller use execution:=stream, or command_interface:=trajectory")
    if interface == "velocity" and on_stale == "stop":
        raise ConfigError(
            "on_stale is 'stop' with command_interface 'velocity': forward_command_controller keeps the last "
            "velocity forever, so the robot would keep moving on stale input; use on_stale:=hold (zero velocity)")
    return ExecutionParams(
        autostart=values["autostart"], allow_demo_commands=values["allow_demo_commands"], execution=mode,
        command_interface=interface, command_joint_names=tuple(values["command_joint_names"]), on_stale=on_stale,
        command_margin_s=values["command_margin_s"], stamp_future_tolerance_s=values["stamp_future_tolerance_s"],
        robot_description=values["robot_description"],
    )


def declare_joint_limits(node: Node, joints: Sequence[str]) -> dict[str, dict[str, float]]:
    """Declare joint_limits.<joint>.* for `joints` (once; a later configure reuses them) and return the values
    that are set (not NaN), by joint and field."""
    found: dict[str, dict[str, float]] = {}
    for joint in joints:
        for spec in joint_limit_parameters(joint):
            if node.has_parameter(spec.name):
                value = node.get_parameter(spec.name).value
            else:
                value = _declare(node, spec)
            if value is not None and value == value:  # not NaN
                found.setdefault(joint, {})[spec.name.rsplit(".", 1)[1]] = float(value)
    return found


def _declare(node: Node, spec: ParamSpec) -> Any:
    """Declare one parameter and return its value. A startup override that cannot apply (wrong type, out of range,
    no value) raises ConfigError naming it: rclpy would raise a bare exception, or (for an empty list `[]`, which
    carries no type) silently keep the default."""
    # An empty list default cannot carry its type (rclpy would guess BYTE_ARRAY): declare by type instead.
    initial = spec.type_ if spec.default == [] else spec.default
    try:
        value = node.declare_parameter(spec.name, initial, spec.descriptor()).value
    except InvalidParameterTypeException as exc:
        given = _override_value(node, spec.name)
        raise ConfigError(
            f"parameter {spec.name} is set to {given!r} ({_type_word(type(given))}) at startup (params file or "
            f"-p {spec.name}:=...), but it is {_TYPE_WORDS[spec.type_]}; {_TYPE_HINTS[spec.type_]}") from exc
    except InvalidParameterValueException as exc:
        given = _override_value(node, spec.name)
        reason = str(exc).split("Reason: ", 1)[-1]
        raise ConfigError(f"parameter {spec.name} is set to {given!r} at startup, which it cannot take: {reason}") \
            from exc
    if value is None:
        if isinstance(spec.default, list):
            # `-p name:=[]` (or `name: []` in YAML) arrives without a type: it means an empty list, not "unset".
            return []
        raise ConfigError(f"parameter {spec.name} is given without a value at startup (`{spec.name}: ~` or null); "
                          f"give it {_TYPE_WORDS[spec.type_]} or leave it out for the default {spec.default!r}")
    return value


_TYPE_WORDS = {_S: "a string", _B: "a bool", _I: "an integer", _F: "a double", _SA: "a list of strings"}
_TYPE_HINTS = {
    _S: "quote the value ('...') if it looks like a number or a bool",
    _B: "write true or false",
    _I: "write a whole number without a decimal point",
    _F: "write it with a decimal point (e.g. 5.0, not 5): ROS 2 parameter types are strict",
    _SA: "write a list, e.g. [base_image] or [\"joint_1\", \"joint_2\"]",
}


def _type_word(python_type: type) -> str:
    words = {str: "a string", bool: "a bool", int: "an integer", float: "a double", list: "a list"}
    return words.get(python_type, python_type.__name__)


def _override_value(node: Node, name: str) -> Any:
    override = _startup_overrides(node).get(name)
    return None if override is None else override.value


def _startup_overrides(node: Node) -> dict[str, Parameter]:
    """The parameter overrides the node started with (params files and -p). rclpy 7.1.6 keeps them in
    Node._parameter_overrides and has no public accessor; an rclpy without it yields none."""
    return dict(getattr(node, "_parameter_overrides", {}) or {})


def unused_overrides(node: Node) -> list[str]:
    """Names of startup overrides that match no declared parameter: typos, a camera.<name>.* for a camera not in
    `cameras`, or another node's parameters in a shared params file. joint_limits.* are declared at configure and
    judged there (`unused_joint_limit_overrides`)."""
    return sorted(name for name in _startup_overrides(node)
                  if not node.has_parameter(name) and not name.startswith("joint_limits."))


# What only a model loaded in this node reads: with policy_backend remote the server's model, conventions and noise
# apply (pi05-serve's own options set them), so a value here would silently do nothing.
LOCAL_MODEL_PARAMETERS = ("checkpoint", "tokenizer", "norm_stats", "config_preset", "demo", "device", "precision",
                          "fp8_calibration_data", "cpu_threads", "seed", "prompt_format", "image_resize",
                          "joint_convention", "action_space", "action_space_mask")


def ignored_by_remote_backend(node: Node) -> list[str]:
    """The local-model parameters set to something other than their default while policy_backend is remote (they
    have no effect there); empty with the local backend."""
    if node.get_parameter("policy_backend").value != "remote":
        return []
    ignored = []
    for name in LOCAL_MODEL_PARAMETERS:
        try:
            value = node.get_parameter(name).value
        except ParameterUninitializedException:  # a list parameter left unset
            continue
        default = _SPECS_BY_NAME[name].default
        if isinstance(value, (list, tuple)) or isinstance(default, (list, tuple)):
            changed = list(value or []) != list(default or [])
        else:
            changed = value != default
        if changed:
            ignored.append(name)
    return ignored


def unused_joint_limit_overrides(node: Node) -> list[str]:
    """joint_limits.* overrides that name no command joint (call after declare_joint_limits)."""
    return sorted(name for name in _startup_overrides(node)
                  if name.startswith("joint_limits.") and not node.has_parameter(name))


def validate_runtime_value(name: str, value: Any) -> str | None:
    """None when `value` is acceptable for the run-time parameter `name`, else the reason it is not."""
    spec = _SPECS_BY_NAME.get(name)
    if spec is None or not spec.dynamic:
        return f"{name} cannot change at run time; set it at startup (params file or -p {name}:=...)"
    expected = {_I: int, _F: float, _S: str, _B: bool}[spec.type_]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"{name} must be of type {expected.__name__}, got {type(value).__name__} {value!r}"
    if spec.int_range and not spec.int_range[0] <= value <= spec.int_range[1]:
        low, high = spec.int_range
        return f"{name}={value} is out of range; use an integer in {low}..{high}"
    if spec.float_range and not spec.float_range[0] <= value <= spec.float_range[1]:
        low, high = spec.float_range
        return f"{name}={value} is out of range; use a value in [{low}, {high}]"
    if spec.choices and value not in spec.choices:
        return f"{name}='{value}' is not one of {', '.join(spec.choices)}"
    return None


def updated_runtime(current: RuntimeSettings, changes: Sequence[Parameter]) -> RuntimeSettings:
    """`current` with the run-time parameters in `changes` applied (others are ignored)."""
    updates = {p.name: p.value for p in changes if p.name in DYNAMIC_PARAMETERS}
    for name in ("rate_hz", "weighted_average_new_weight", "temporal_ensemble_decay", "rtc_beta"):
        if name in updates:
            updates[name] = float(updates[name])
    return RuntimeSettings(**{**current.__dict__, **updates})

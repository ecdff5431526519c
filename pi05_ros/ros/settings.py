"""Settings records the node hands to the inference thread. No ROS imports: the worker (and its GPU test)
use them without rclpy; params.py fills them from ROS parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CameraConfig:
    name: str  # input name == relative topic of raw images
    slot: str
    transport: str
    # --- input rules (issue 11): the largest frame this camera takes (ros/input_rules.py)
    max_width: int = 2048
    max_height: int = 2048

    @property
    def topic(self) -> str:
        return self.name if self.transport == "raw" else f"{self.name}/compressed"


@dataclass(frozen=True)
class RuntimeSettings:
    """The run-time changeable parameters; replaced as a whole, so the worker reads a consistent set."""

    denoise_steps: int
    rate_hz: float
    default_instruction: str
    publish_joint_trajectory: bool
    # --- execution (issue 13): the stream mode's hand-over (execution/blend.py)
    blend: str = "replace"
    crossfade_actions: int = 5
    weighted_average_new_weight: float = 0.7
    temporal_ensemble_decay: float = 0.01
    # --- real-time chunking (issue 8): blend rtc (execution/rtc.py, engine/rtc.py)
    rtc_beta: float = 5.0
    rtc_overlap: int = 0
    rtc_schedule: str = "exp"


@dataclass(frozen=True)
class ExecutionParams:
    """The startup parameters of what the node commands (execution/ and docs/ros_node.md, "Connecting to your
    robot")."""

    autostart: bool
    allow_demo_commands: bool
    execution: str  # chunk | stream
    command_interface: str  # trajectory | position | velocity
    command_joint_names: tuple[str, ...]
    on_stale: str  # hold | stop
    command_margin_s: float
    stamp_future_tolerance_s: float
    robot_description: str

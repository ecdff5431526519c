"""Settings records the node hands to the inference thread. No ROS imports: the worker (and its GPU test)
use them without rclpy; params.py fills them from ROS parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CameraConfig:
    name: str  # input name == relative topic of raw images
    slot: str
    transport: str

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

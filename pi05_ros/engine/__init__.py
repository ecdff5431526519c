"""The Pi0.5 inference engine. Imports neither rclpy nor anything that needs a GPU."""

from pi05_ros.engine.errors import CheckpointError, InputError, Pi05Error

__all__ = ["CheckpointError", "InputError", "Pi05Error"]

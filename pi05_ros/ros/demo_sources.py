"""The `pi05_demo_sources` node (executable `demo_sources`): synthetic camera frames, joint states and an
instruction, so that the policy node runs its whole loop without a robot.

Frames are a fixed colour gradient with a square moving across it; joints follow slow sine waves. Topic
names are relative and match the policy node's defaults, so both start in the same namespace as they are.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from pi05_ros.ros.process import init_ros

DEFAULT_JOINTS = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper"]
DEFAULT_INSTRUCTION = "pick up the red cube and put it in the bowl"
_CHANNEL_ORDER = {"rgb8": (0, 1, 2), "bgr8": (2, 1, 0)}


class DemoSources(Node):
    def __init__(self) -> None:
        super().__init__("pi05_demo_sources")

        def declare(name: str, default: object, description: str) -> object:
            return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

        self._cameras = list(declare("cameras", ["base_image", "wrist_image"], "Image topics to publish."))
        width = int(declare("image_width", 320, "Frame width in pixels."))
        height = int(declare("image_height", 240, "Frame height in pixels."))
        self._encoding = str(declare("image_encoding", "rgb8", "rgb8 or bgr8."))
        camera_rate = float(declare("camera_rate_hz", 15.0, "Frames per second per camera."))
        joint_rate = float(declare("joint_rate_hz", 50.0, "JointState messages per second."))
        self._joints = list(declare("joint_names", DEFAULT_JOINTS, "Joint names of the JointState messages."))
        instruction = str(declare("instruction", DEFAULT_INSTRUCTION,
                                  "Task sent on `instruction` (transient local); can change at run time."))
        if self._encoding not in _CHANNEL_ORDER:
            raise ValueError(f"image_encoding '{self._encoding}' is not supported here; use rgb8 or bgr8")

        self._frames = {name: _Frame(width, height, seed=i) for i, name in enumerate(self._cameras)}
        self._image_pubs = {name: self.create_publisher(Image, name, qos_profile_sensor_data)
                            for name in self._cameras}
        self._joint_pub = self.create_publisher(JointState, "joint_states", qos_profile_sensor_data)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._instruction_pub = self.create_publisher(String, "instruction", latched)
        self._publish_instruction(instruction)
        self.add_on_set_parameters_callback(self._on_parameters)

        self._tick = 0
        self.create_timer(1.0 / camera_rate, self._publish_frames)
        self.create_timer(1.0 / joint_rate, self._publish_joints)
        self.get_logger().info(
            f"publishing {', '.join(self._cameras)} ({width}x{height} {self._encoding} at {camera_rate:g} Hz), "
            f"joint_states ({len(self._joints)} joints at {joint_rate:g} Hz) and instruction {instruction!r}"
        )

    def _publish_instruction(self, text: str) -> None:
        self._instruction_pub.publish(String(data=text))

    def _on_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name == "instruction":
                self._publish_instruction(str(parameter.value))
            else:
                return SetParametersResult(successful=False, reason=f"{parameter.name} is fixed at startup")
        return SetParametersResult(successful=True)

    def _publish_frames(self) -> None:
        stamp = self.get_clock().now().to_msg()
        self._tick += 1
        order = _CHANNEL_ORDER[self._encoding]
        for name, frame in self._frames.items():
            pixels = frame.render(self._tick)
            msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=self._encoding,
                        is_bigendian=0, step=pixels.shape[1] * 3)
            msg.header.stamp = stamp
            msg.header.frame_id = f"{name}_optical_frame"
            msg.data = pixels[:, :, order].tobytes()
            self._image_pubs[name].publish(msg)

    def _publish_joints(self) -> None:
        now = self.get_clock().now()
        t = now.nanoseconds * 1e-9
        positions = [0.6 * math.sin(0.5 * t + i) for i in range(len(self._joints))]
        positions[-1] = 0.5 + 0.5 * math.sin(0.3 * t)  # gripper opening in [0, 1]
        msg = JointState(name=self._joints, position=positions)
        msg.header.stamp = now.to_msg()
        self._joint_pub.publish(msg)


class _Frame:
    """A colour gradient with a square moving across it, rendered into one reused array."""

    def __init__(self, width: int, height: int, seed: int) -> None:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        hue = (seed * 97) % 255
        self._background = np.stack(
            [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full_like(x, hue)], axis=-1
        ).astype(np.uint8)
        self._pixels = self._background.copy()
        self._size = max(4, min(width, height) // 5)

    def render(self, tick: int) -> np.ndarray:
        height, width, _ = self._pixels.shape
        np.copyto(self._pixels, self._background)
        x = (tick * 4) % max(width - self._size, 1)
        y = (height - self._size) // 2
        self._pixels[y:y + self._size, x:x + self._size] = (220, 30, 30)
        return self._pixels


def main(argv: list[str] | None = None) -> int:
    stop = init_ros(argv)
    try:
        node = DemoSources()
    except ValueError as exc:
        get_logger("pi05_demo_sources").fatal(str(exc))
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    while not stop.is_set():
        executor.spin_once(timeout_sec=0.05)
    executor.shutdown(timeout_sec=0.2)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

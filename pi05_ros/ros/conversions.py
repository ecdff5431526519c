"""Conversions between ROS messages and numpy, both directions, for the node.

Inputs (`sensor_msgs/Image`, `sensor_msgs/CompressedImage`, `sensor_msgs/JointState` -> numpy) work on any
object with those messages' fields; each raises `ConversionError` with a message that names the cause and the
fix, which the node reports on /diagnostics while it keeps running. Outputs (an action chunk -> `ActionChunk`;
the commands of pi05_ros/execution/ -> `trajectory_msgs/JointTrajectory` and `std_msgs/Float64MultiArray`) build
the real messages, importing their types when called, so this module itself imports no ROS package (the
inference thread and its GPU test use it without ROS).
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from pi05_ros.ros.problems import shorten

NANOSECONDS = 1_000_000_000

# encoding -> (channels, index of R, G, B in a pixel); mono8 is replicated into all three.
_IMAGE_LAYOUTS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}
SUPPORTED_IMAGE_ENCODINGS: tuple[str, ...] = tuple(_IMAGE_LAYOUTS)


class ConversionError(ValueError):
    """A message that cannot be turned into a policy input; str() names the cause and the fix."""


def image_shape(msg: Any) -> tuple[int, int]:
    """(height, width) of a `sensor_msgs/Image`, after checking that its fields agree with its data."""
    encoding = msg.encoding.lower()
    if encoding not in _IMAGE_LAYOUTS:
        raise ConversionError(
            f"image encoding '{msg.encoding}' is not supported; publish one of "
            f"{', '.join(SUPPORTED_IMAGE_ENCODINGS)} (set the camera driver's pixel format) or switch this "
            "camera's transport parameter to 'compressed' and publish jpeg/png"
        )
    channels = _IMAGE_LAYOUTS[encoding][0]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ConversionError(f"image is empty ({width}x{height}); the camera publishes no pixels")
    if step < width * channels:
        raise ConversionError(
            f"image step {step} is shorter than width*channels = {width}*{channels} for {encoding}; "
            "the publisher must set step to the byte length of one row"
        )
    if len(msg.data) != height * step:
        raise ConversionError(
            f"image data is {len(msg.data)} bytes but height*step = {height}*{step} = {height * step}; "
            "the publisher's height/step disagree with its data (fix the driver or the bridge that fills it)"
        )
    return height, width


def image_view(msg: Any) -> np.ndarray:
    """Zero-copy [height, width, channels] uint8 view of a `sensor_msgs/Image`'s pixels in its own channel
    order. Rows padded beyond width*channels (step > width*channels) are skipped through strides."""
    height, width = image_shape(msg)
    channels = _IMAGE_LAYOUTS[msg.encoding.lower()][0]
    step = int(msg.step)
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=height * step).reshape(height, step)
    return rows[:, : width * channels].reshape(height, width, channels)


def image_to_rgb(msg: Any, out: np.ndarray | None = None) -> np.ndarray:
    """`sensor_msgs/Image` -> uint8 [height, width, 3] RGB, written into `out` when its shape fits."""
    pixels = image_view(msg)
    height, width, _ = pixels.shape
    out = _output_buffer(out, height, width)
    order = _IMAGE_LAYOUTS[msg.encoding.lower()][1]
    if order == (0, 1, 2):
        np.copyto(out, pixels[:, :, :3])
    elif pixels.shape[2] == 1:
        np.copyto(out, np.broadcast_to(pixels, out.shape))
    else:
        # Reversed channel view (BGR -> RGB) copied in one strided pass; no intermediate array.
        np.copyto(out, pixels[:, :, 2::-1])
    return out


def compressed_format(msg: Any) -> str:
    """'jpeg' or 'png' from a `sensor_msgs/CompressedImage` format string such as 'jpeg', 'png' or
    image_transport's 'rgb8; jpeg compressed bgr8'."""
    text = msg.format.lower()
    if "jpeg" in text or "jpg" in text:
        return "jpeg"
    if "png" in text:
        return "png"
    raise ConversionError(
        f"compressed image format '{msg.format}' is not supported; publish jpeg or png "
        "(image_transport's compressed plugin does by default) or switch this camera's transport to 'raw'"
    )


def compressed_to_rgb(msg: Any, out: np.ndarray | None = None) -> np.ndarray:
    """`sensor_msgs/CompressedImage` (jpeg/png) -> uint8 [height, width, 3] RGB, into `out` when it fits.

    Grayscale files become three equal channels; a PNG's alpha channel is dropped."""
    kind = compressed_format(msg)
    if len(msg.data) == 0:
        raise ConversionError(f"compressed {kind} image has no data; the publisher sent an empty message")
    encoded = np.frombuffer(msg.data, dtype=np.uint8)
    try:  # the header's orientation is ignored: the size checked before decoding is the size decoded
        bgr = cv2.imdecode(encoded, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as exc:  # OpenCV's own limits (e.g. more than 2^30 pixels) raise instead of returning None
        raise ConversionError(f"could not decode the {len(msg.data)}-byte compressed image as {kind}: "
                              f"{str(exc).strip().splitlines()[-1]}") from exc
    if bgr is None or bgr.size == 0:
        raise ConversionError(
            f"could not decode the {len(msg.data)}-byte compressed image as {kind} (format field "
            f"'{msg.format}'); the data is corrupt or its format field is wrong"
        )
    out = _output_buffer(out, bgr.shape[0], bgr.shape[1])
    cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)
    return out


def _output_buffer(out: np.ndarray | None, height: int, width: int) -> np.ndarray:
    if out is not None and out.shape == (height, width, 3) and out.dtype == np.uint8 and out.flags.c_contiguous:
        return out
    return np.empty((height, width, 3), dtype=np.uint8)


class JointSelector:
    """Picks and orders joint positions from `sensor_msgs/JointState` by name.

    With no names configured, takes every position in the message's order. The name -> index map is cached
    for the last seen name list, because drivers publish the same names at hundreds of Hz.

    Rules for joint states that are well-formed but cannot be meant (docs/ros_node.md, "Input rules"): a joint the
    state uses that the message names twice is ambiguous (which position is meant?) and refused; a position that
    is NaN, infinite or larger in magnitude than `max_abs_position` (positions are rad or m) is refused, naming the
    joint. Checked in float64 before the float32 cast, so 1e39 is named, not overflowed with a numpy warning.
    """

    def __init__(self, names: Sequence[str], max_abs_position: float = float("inf")) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.max_abs_position = max_abs_position
        self._cached_message_names: tuple[str, ...] | None = None
        self._cached_indices: np.ndarray | None = None

    def positions(self, msg: Any, out: np.ndarray | None = None) -> np.ndarray:
        """float32 positions in the configured order, written into `out` when its length fits."""
        position = msg.position
        message_names = tuple(msg.name)
        if message_names != self._cached_message_names:
            self._cached_indices = self._indices(message_names)
            self._cached_message_names = message_names
        if message_names and len(position) != len(message_names):
            raise ConversionError(
                f"joint_states has {len(message_names)} names but {len(position)} positions; "
                "the driver must publish one position per name"
            )
        if not self.names:
            values = np.asarray(position, dtype=np.float64)
            if values.size == 0:
                raise ConversionError(
                    "joint_states message has no positions; the driver must fill `position` "
                    "(or set state_joint_names to the joints to use)"
                )
            self._check_values(values, message_names, None)
            return _into(out, values)
        if len(position) != len(message_names):
            raise ConversionError(
                f"joint_states has {len(message_names)} names but {len(position)} positions; "
                "the driver must publish one position per name"
            )
        values = np.asarray(position, dtype=np.float64)[self._cached_indices]
        self._check_values(values, message_names, self._cached_indices)
        return _into(out, values)

    def _indices(self, message_names: tuple[str, ...]) -> np.ndarray | None:
        """Indices of the configured joints in the message (None: all, in order); checks for duplicates."""
        used = self.names or message_names
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(message_names):
            seen.setdefault(name, []).append(i)
        doubled = [f"{name} (at {', '.join(map(str, seen[name]))})" for name in dict.fromkeys(used)
                   if len(seen.get(name, ())) > 1]
        if doubled:
            raise ConversionError(
                f"joint_states names joint(s) {shorten(', '.join(doubled), 300)} more than once, so which position "
                "is meant is ambiguous; the driver (or a joint_state_publisher merging sources) must publish each "
                "joint once")
        if not self.names:
            return None
        missing = [name for name in self.names if name not in seen]
        if missing:
            raise ConversionError(
                f"joint_states lacks joint(s) {', '.join(missing)} named in state_joint_names; it has "
                f"[{shorten(', '.join(message_names), 300)}]. Fix state_joint_names or remap joint_states to the "
                "right topic"
            )
        return np.array([seen[name][0] for name in self.names], dtype=np.intp)

    def _check_values(self, values: np.ndarray, message_names: tuple[str, ...], indices: np.ndarray | None) -> None:
        bad = ~(np.abs(values) <= self.max_abs_position)  # NaN compares False: caught here too
        if not bad.any():
            return
        where = np.flatnonzero(bad)
        described = []
        for k in where[:5]:
            index = int(indices[k]) if indices is not None else int(k)
            name = message_names[index] if index < len(message_names) else f"position[{index}]"
            described.append(f"{name} = {'NaN' if np.isnan(values[k]) else format(values[k], 'g')}")
        more = f" and {len(where) - 5} more" if len(where) > 5 else ""
        raise ConversionError(
            f"joint_states position(s) {', '.join(described)}{more} not finite or beyond max_abs_joint_position "
            f"{self.max_abs_position:g} (positions are rad or m): the driver reports a fault or wrong units; fix it, "
            "or check state_joint_names picks the right joints")


def _into(out: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    if out is not None and out.shape == values.shape and out.dtype == np.float32:
        np.copyto(out, values, casting="same_kind")
        return out
    return values.astype(np.float32)


# --- outputs


def stamp_to_ns(stamp: Any) -> int:
    """A `builtin_interfaces/Time` (a header stamp) as integer nanoseconds."""
    return int(stamp.sec) * NANOSECONDS + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Any:
    """Integer nanoseconds as a `builtin_interfaces/Time`."""
    from builtin_interfaces.msg import Time

    return Time(sec=ns // NANOSECONDS, nanosec=ns % NANOSECONDS)


def action_chunk_message(actions: np.ndarray, *, stamp_ns: int, joint_names: Sequence[str], action_dt: float,
                         denoise_steps: int, latency_s: float, sequence: int, demo_model: bool,
                         action_kinds: Sequence[str] = ()) -> Any:
    """`pi05_ros/ActionChunk` of actions [horizon, dof] (row-major float32), stamped with the observation's stamp;
    `action_kinds` per column: position, velocity or other (the engine's ActionSpace.output_kinds)."""
    from pi05_ros.msg import ActionChunk

    msg = ActionChunk()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.joint_names = list(joint_names)
    msg.horizon, msg.action_dim = (int(n) for n in actions.shape)
    msg.action_dt = action_dt
    msg.actions = array.array("f", actions.astype("float32", copy=False).tobytes())
    msg.denoise_steps = int(denoise_steps)
    msg.inference_latency = latency_s
    msg.sequence = sequence
    msg.demo_model = demo_model
    msg.action_kinds = list(action_kinds)
    return msg


def _duration(ns: int) -> Any:
    from builtin_interfaces.msg import Duration

    return Duration(sec=int(ns) // NANOSECONDS, nanosec=int(ns) % NANOSECONDS)


def trajectory_message(joint_names: Sequence[str], stamp_ns: int, times_from_start_ns: Sequence[int],
                       positions: np.ndarray) -> Any:
    """`trajectory_msgs/JointTrajectory`: point i has `positions[i]` at `times_from_start_ns[i]` after
    header.stamp = `stamp_ns` (0: joint_trajectory_controller starts it on arrival). Positions only: JTC in
    Jazzy refuses a trajectory whose last point has a nonzero velocity (allow_nonzero_velocity_at_trajectory_end
    is false by default)."""
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    trajectory = JointTrajectory(joint_names=list(joint_names))
    trajectory.header.stamp = ns_to_stamp(int(stamp_ns))
    rows = np.asarray(positions, dtype=np.float64)
    for elapsed_ns, row in zip(times_from_start_ns, rows, strict=True):
        trajectory.points.append(JointTrajectoryPoint(positions=array.array("d", row.tobytes()),
                                                      time_from_start=_duration(elapsed_ns)))
    return trajectory


def joint_trajectory_message(actions: np.ndarray, joint_names: Sequence[str], action_dt: float) -> Any:
    """Every action row as a point, point k at (k + 1) * action_dt after a zero stamp (start on arrival)."""
    times = [round((k + 1) * action_dt * 1e9) for k in range(len(actions))]
    return trajectory_message(joint_names, 0, times, np.asarray(actions, dtype=np.float32).astype(np.float64))


def float64_array_message(values: np.ndarray) -> Any:
    """`std_msgs/Float64MultiArray` of `values` in order (forward_command_controller's `commands`: no layout,
    value i goes to the controller's joints[i])."""
    from std_msgs.msg import Float64MultiArray

    return Float64MultiArray(data=array.array("d", np.asarray(values, dtype=np.float64).tobytes()))

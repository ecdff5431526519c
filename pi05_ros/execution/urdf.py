"""Joint limits from a URDF (the `robot_description` string robot_state_publisher and ros2_control read).

Parsed with urdf_parser_py (PyPI `urdfdom-py`, the same module a ROS 2 install ships as ros-jazzy-urdfdom-py).
Per joint: `<limit lower upper velocity>`; a `continuous` joint has no position range (its lower/upper are
ignored); URDF has no acceleration limits (they come from parameters, as in ros2_control and MoveIt). A
revolute or prismatic joint without `<limit>` is an error: the URDF spec requires one. No ROS imports.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

from pi05_ros.execution.limits import JointLimit
from pi05_ros.execution.plan import ExecutionConfigError


def limits_from_urdf(robot_description: str, joints: Sequence[str]) -> dict[str, JointLimit]:
    """The limits of `joints` in the URDF text. Raises ExecutionConfigError naming the cause and the fix."""
    try:
        from urdf_parser_py.urdf import URDF
    except ImportError as exc:  # pragma: no cover - installed by scripts/setup.sh and on ROS (urdfdom_py)
        raise ExecutionConfigError(
            "robot_description is set but urdf_parser_py is not installed; pip install urdfdom-py "
            "(or apt install ros-jazzy-urdfdom-py), or leave robot_description empty and give the limits as "
            "joint_limits.<joint>.* parameters") from exc
    # The parser prints "Unknown tag" for <ros2_control>, <gazebo>, ... on stderr: harmless, kept quiet.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            robot = URDF.from_xml_string(robot_description.encode() if isinstance(robot_description, str)
                                         else robot_description)
    except Exception as exc:  # noqa: BLE001 - lxml and the parser raise several types
        raise ExecutionConfigError(f"robot_description is not a URDF the parser reads: {exc}") from exc
    by_name = {joint.name: joint for joint in robot.joints}
    missing = [name for name in joints if name not in by_name]
    if missing:
        raise ExecutionConfigError(
            f"robot_description has no joint(s) {missing} (it has {sorted(by_name)}); make command_joint_names "
            "the URDF's joint names or leave robot_description empty")
    limits: dict[str, JointLimit] = {}
    for name in joints:
        joint = by_name[name]
        limit = joint.limit
        if joint.type in ("revolute", "prismatic") and limit is None:
            raise ExecutionConfigError(f"URDF joint '{name}' ({joint.type}) has no <limit>; the URDF must give one")
        if limit is None:
            limits[name] = JointLimit()
            continue
        bounded = joint.type in ("revolute", "prismatic")
        velocity = float(limit.velocity) if limit.velocity else math.inf  # 0 or absent: no limit given
        lower = float(limit.lower) if bounded and limit.lower is not None else -math.inf
        upper = float(limit.upper) if bounded and limit.upper is not None else math.inf
        if math.isnan(lower) or math.isnan(upper) or math.isnan(velocity) or velocity < 0:
            raise ExecutionConfigError(f"URDF joint '{name}' has an invalid <limit> (lower {limit.lower}, upper "
                                       f"{limit.upper}, velocity {limit.velocity}); fix the URDF")
        limits[name] = JointLimit(min_position=lower, max_position=upper, max_velocity=velocity)
    return limits

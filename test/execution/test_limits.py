"""Joint limits: each clipping formula of limits.py, exact values, and the URDF reader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pi05_ros.execution.limits import JointLimit, JointLimits, clip_positions, clip_velocities
from pi05_ros.execution.plan import ExecutionConfigError
from pi05_ros.execution.urdf import limits_from_urdf

DT = 0.05
NAN2 = np.full(2, np.nan)


def limits(**per_joint: JointLimit) -> JointLimits:
    return JointLimits.of(list(per_joint), per_joint)


def test_unlimited_commands_pass_bit_for_bit() -> None:
    desired = np.array([[0.1, 0.2], [0.15, 0.3]])
    out, _, counts = clip_positions(desired, np.zeros(2), NAN2, JointLimits.none(["a", "b"]), DT)
    assert np.array_equal(out, desired) and counts.clipped_commands == 0 and counts.commands == 2


def test_position_range_clips_exactly() -> None:
    lim = limits(a=JointLimit(-1.0, 1.0), b=JointLimit(0.0, 0.04))
    out, _, counts = clip_positions(np.array([[1.5, -0.1], [0.5, 0.02]]), NAN2, NAN2, lim, DT)
    assert out.tolist() == [[1.0, 0.0], [0.5, 0.02]]
    assert counts.position == 2 and counts.clipped_commands == 1


def test_velocity_limit_steps_at_most_v_max_dt_from_the_previous_command() -> None:
    lim = limits(a=JointLimit(max_velocity=1.0), b=JointLimit())
    out, velocities, counts = clip_positions(np.array([[0.2, 5.0], [0.22, 5.0]]), np.zeros(2), NAN2, lim, DT)
    assert out[0, 0] == pytest.approx(0.05) and out[0, 1] == 5.0  # 1 rad/s * 0.05 s
    assert out[1, 0] == pytest.approx(0.10)  # still limited, chasing 0.22
    assert velocities[0, 0] == pytest.approx(1.0) and counts.velocity == 2


def test_acceleration_limit_changes_velocity_by_at_most_a_max_dt() -> None:
    lim = limits(a=JointLimit(max_acceleration=2.0))  # 0.1 rad/s per period
    out, velocities, counts = clip_positions(np.array([[0.05]]), np.array([0.0]), np.array([0.0]), lim, DT)
    assert velocities[0, 0] == pytest.approx(0.1) and out[0, 0] == pytest.approx(0.005)
    assert counts.acceleration == 1


def test_velocity_commands_clip_speed_and_stay_in_the_position_range() -> None:
    lim = limits(a=JointLimit(-1.0, 1.0, max_velocity=2.0), b=JointLimit(-1.0, 1.0))
    v, p, counts = clip_velocities(np.array([[3.0, 4.0]]), np.array([0.0, 0.9]), NAN2, lim, DT)
    assert v[0, 0] == 2.0  # speed
    assert v[0, 1] == pytest.approx(2.0)  # (1.0 - 0.9) / 0.05: reaches the bound, not beyond
    assert p[0, 1] == pytest.approx(1.0) and counts.velocity == 1 and counts.position == 1
    # beyond the bound already: it may stand still or move back, never further out
    v, _, _ = clip_velocities(np.array([[1.0, -1.0]]), np.array([1.2, 1.2]), NAN2, lim, DT)
    assert v[0].tolist() == [0.0, -1.0]


def test_overrides_replace_only_the_values_they_set() -> None:
    merged = JointLimit(-1.0, 1.0, 2.0).merged(JointLimit(max_velocity=0.5))
    assert merged == JointLimit(-1.0, 1.0, 0.5, math.inf)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="min_position > max_position"):
        limits(a=JointLimit(1.0, -1.0))
    with pytest.raises(ValueError, match="max_velocity <= 0"):
        limits(a=JointLimit(max_velocity=0.0))
    # NaN would pass every comparison and turn commands into NaN (or no limit at all)
    with pytest.raises(ValueError, match="a NaN bound"):
        limits(a=JointLimit(min_position=math.nan))
    with pytest.raises(ValueError, match="max_acceleration <= 0 or NaN"):
        limits(a=JointLimit(max_acceleration=math.nan))


def test_a_joint_already_past_its_bound_moves_back_at_the_rate_limits_not_at_once() -> None:
    lim = limits(a=JointLimit(-1.0, 1.0, max_velocity=1.0), b=JointLimit(-1.0, 1.0))
    out, velocities, _ = clip_positions(np.array([[1.0, 1.0], [1.0, 1.5]]), np.array([1.4, 1.4]), NAN2, lim, DT)
    assert out[0, 0] == pytest.approx(1.35) and velocities[0, 0] == pytest.approx(-1.0)  # 1 rad/s back in
    assert out[1, 0] == pytest.approx(1.30)
    assert out[0, 1] == 1.0  # no speed limit: straight to the target, inside the range
    assert out[1, 1] == 1.0  # and never out again


def test_the_first_step_may_have_its_own_duration() -> None:
    lim = limits(a=JointLimit(max_velocity=1.0))
    out, velocities, _ = clip_positions(np.array([[1.0], [1.0]]), np.array([0.0]), np.array([np.nan]), lim, DT,
                                        first_dt_s=0.02)
    assert out[0, 0] == pytest.approx(0.02) and velocities[0, 0] == pytest.approx(1.0)  # 20 ms at 1 rad/s
    assert out[1, 0] == pytest.approx(0.07)  # then a period of 50 ms


URDF = """<?xml version="1.0"?>
<robot name="arm">
  <link name="base"/><link name="l1"/><link name="l2"/><link name="l3"/><link name="l4"/>
  <joint name="shoulder" type="revolute"><parent link="base"/><child link="l1"/><axis xyz="0 0 1"/>
    <limit lower="-2.5" upper="2.5" velocity="1.5" effort="40"/></joint>
  <joint name="wrist" type="continuous"><parent link="l1"/><child link="l2"/><axis xyz="0 1 0"/>
    <limit velocity="3.0" effort="10"/></joint>
  <joint name="slide" type="prismatic"><parent link="l2"/><child link="l3"/><axis xyz="1 0 0"/>
    <limit lower="0.0" upper="0.04" velocity="0.2" effort="100"/></joint>
  <joint name="mount" type="fixed"><parent link="l3"/><child link="l4"/></joint>
  <ros2_control name="hw" type="system"><hardware><plugin>mock_components/GenericSystem</plugin></hardware>
  </ros2_control>
</robot>
"""


def test_urdf_limits_with_continuous_joints_unbounded() -> None:
    found = limits_from_urdf(URDF, ["shoulder", "wrist", "slide"])
    assert found["shoulder"] == JointLimit(-2.5, 2.5, 1.5)
    assert found["wrist"] == JointLimit(max_velocity=3.0)  # continuous: lower/upper are not a range
    assert found["slide"] == JointLimit(0.0, 0.04, 0.2)


def test_urdf_errors_name_the_cause() -> None:
    with pytest.raises(ExecutionConfigError, match=r"no joint\(s\) \['elbow'\]"):
        limits_from_urdf(URDF, ["elbow"])
    with pytest.raises(ExecutionConfigError, match="not a URDF"):
        limits_from_urdf("<robot", ["a"])
    no_limit = URDF.replace('<limit lower="-2.5" upper="2.5" velocity="1.5" effort="40"/>', "")
    with pytest.raises(ExecutionConfigError, match="has no <limit>"):
        limits_from_urdf(no_limit, ["shoulder"])
    for bad in ('lower="nan" upper="2.5" velocity="1.5"', 'lower="-2.5" upper="2.5" velocity="-2"',
                'lower="-2.5" upper="2.5" velocity="nan"'):
        broken = URDF.replace('lower="-2.5" upper="2.5" velocity="1.5"', bad)
        with pytest.raises(ExecutionConfigError, match="URDF joint 'shoulder' has an invalid <limit>"):
            limits_from_urdf(broken, ["shoulder"])
    zero = URDF.replace('velocity="1.5"', 'velocity="0"')  # what many generated URDFs write for "not given"
    assert limits_from_urdf(zero, ["shoulder"])["shoulder"] == JointLimit(-2.5, 2.5)

"""Joint limits: each clipping formula of limits.py, exact values, and the URDF reader."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pi05_ros.execution.limits import (
    MAX_BRAKING_PERIODS,
    JointLimit,
    JointLimits,
    braking,
    braking_by_steps,
    braking_step,
    clip_positions,
    clip_velocities,
)
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


def test_braking_slows_every_joint_together_the_slowest_to_stop_at_exactly_its_acceleration_limit() -> None:
    lim = limits(a=JointLimit(max_acceleration=2.0), b=JointLimit(max_acceleration=4.0), c=JointLimit())
    start, speed = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, -0.5])
    positions, velocities, counts = braking(start, speed, lim, DT)
    # joint a needs 1 / 2 = 0.5 s to stop at 2 rad/s^2 (b 0.25 s alone): 10 periods, each 0.1 rad/s less for a
    assert len(positions) == 10 and not velocities[-1].any() and counts.clipped_commands == 0
    np.testing.assert_allclose(velocities[:, 0], 1.0 - 0.1 * np.arange(1, 11), atol=1e-12)  # float rounding
    np.testing.assert_allclose(velocities[:, 1], velocities[:, 0], atol=1e-12)  # b slows with a: one direction
    # c has no acceleration limit: nothing bounds its deceleration, so it moves no further on stale data
    assert not velocities[:, 2].any() and (positions[:, 2] == -1.0).all()
    # positions are the segments' sums: joint a moves 0.05 * (0.9 + 0.8 + ... + 0) = 0.225 rad more
    np.testing.assert_allclose(positions, start + np.cumsum(velocities * DT, axis=0), atol=1e-12)
    assert positions[-1, 0] == pytest.approx(0.225, abs=1e-12)
    assert np.array_equal(positions[-1], positions[-2])  # at rest: the last segment does not move
    changes = np.abs(np.diff(np.vstack([speed, velocities]), axis=0))
    assert (changes[:, :2] <= np.array([2.0, 4.0]) * DT + 1e-12).all()


def test_braking_without_an_acceleration_limit_or_motion_holds_where_it_is() -> None:
    start = np.array([0.3, -0.2])
    for lim, speed in ((JointLimits.none(["a", "b"]), np.array([1.0, 1.0])),
                       (limits(a=JointLimit(max_acceleration=1.0), b=JointLimit()), np.array([0.0, 1.0])),
                       (limits(a=JointLimit(max_acceleration=1.0), b=JointLimit()), NAN2)):  # NaN: unknown
        positions, velocities, _ = braking(start, speed, lim, DT)
        assert np.array_equal(positions, start[None, :]) and not velocities.any()


def test_braking_stops_at_the_position_range_counts_it_and_unknown_positions_stay_unknown() -> None:
    lim = limits(a=JointLimit(max_position=0.1, max_acceleration=1.0), b=JointLimit(max_acceleration=1.0))
    positions, velocities, counts = braking(np.array([0.0, np.nan]), np.array([1.0, 1.0]), lim, DT)
    # 1 rad/s at 1 rad/s^2 would go 0.475 rad on: a stops at its bound (the range overrides the acceleration
    # limit), b's speed still ramps down to 0
    assert positions[:, 0].max() == 0.1 and np.isnan(positions[:, 1]).all()
    assert len(positions) == 20 and not velocities[-1].any()
    # clipped twice: the period that reaches the bound, and the next (what is left of its speed, stopped there)
    assert counts.position == 2 and counts.clipped_commands == 2 and counts.commands == 20
    step_p, step_u, _ = braking_step(np.array([0.1, 0.0]), np.array([0.5, 0.5]), lim, DT)
    assert step_p[0] == 0.1 and step_u[0] == 0.0 and step_u[1] == pytest.approx(0.45)


def test_a_stop_beyond_max_braking_periods_ramps_down_harder_to_rest_within_them() -> None:
    positions, velocities, _ = braking(np.zeros(1), np.array([2.0]), limits(a=JointLimit(max_acceleration=0.05)),
                                       0.02)
    # 2 rad/s at 0.05 rad/s^2 would need 40 s (2000 periods of 20 ms): it ramps down over the 1000 instead
    assert len(positions) == MAX_BRAKING_PERIODS and not velocities[-1].any()
    assert positions[-1, 0] == positions[-2, 0]  # at rest on the last row: JTC sees positions only
    speeds = np.diff(np.concatenate([[0.0], positions[:, 0]])) / 0.02
    assert (np.abs(np.diff(np.concatenate([[2.0], speeds]))) <= 2.0 / 20.0 * 0.02 + 1e-9).all()  # 0.1 rad/s^2


def test_braking_in_closed_form_equals_its_stepwise_definition() -> None:
    """braking's closed form (what a chunk's tail runs) against braking_step repeated, over random motions: limited
    and unlimited joints, unknown speeds and positions, stops past the period cap; where the range clips, braking
    runs the steps itself. 1e-9: float rounding of sums over up to 1000 periods."""
    rng = np.random.default_rng(0)
    for case in range(200):
        accel = rng.choice([0.05, 0.5, 2.0, 10.0, np.inf], size=4)
        bound = rng.choice([np.inf, 0.3])
        lim = JointLimits.of(list("abcd"), {n: JointLimit(-bound, bound, max_acceleration=a)
                                            for n, a in zip("abcd", accel, strict=True)})
        start = rng.uniform(-0.2, 0.2, 4)
        speed = rng.uniform(-3, 3, 4) * rng.choice([0.0, 0.01, 1.0], size=4)
        if case % 10 == 0:
            speed[0], start[1] = np.nan, np.nan
        dt = rng.choice([0.01, 0.02, 0.05])
        fast = braking(start, speed, lim, dt)
        steps = braking_by_steps(start, speed, lim, dt)
        assert fast[0].shape == steps[0].shape, case
        np.testing.assert_allclose(fast[0], steps[0], atol=1e-9, err_msg=str(case))
        np.testing.assert_allclose(fast[1], steps[1], atol=1e-9, err_msg=str(case))
        assert vars(fast[2]) == vars(steps[2]), case
        assert not fast[1][-1].any() and len(fast[0]) <= MAX_BRAKING_PERIODS


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

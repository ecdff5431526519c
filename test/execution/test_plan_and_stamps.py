"""Chunk timing, the action-space conversions of a chunk into commands, and the stamp rule (no ROS)."""

from __future__ import annotations

import numpy as np
import pytest

from pi05_ros.engine.action_space import ActionSpace
from pi05_ros.execution.plan import ExecutionConfigError, command_columns, due_ns, plan_chunk
from pi05_ros.execution.stamps import StampIssue, judge_stamp

MS = 1_000_000
DT = 50 * MS


def test_action_k_is_due_at_t_obs_plus_k_plus_one_periods() -> None:
    assert due_ns(1_000 * MS, 0, DT) == 1_050 * MS
    assert list(due_ns(1_000 * MS, np.arange(3), DT)) == [1_050 * MS, 1_100 * MS, 1_150 * MS]


def test_an_observation_0_3_s_old_at_dt_0_05_starts_at_action_6() -> None:
    columns = command_columns(["a"], ActionSpace.uniform("absolute", 1).output_kinds, 1)
    chunk = plan_chunk(np.arange(10.0)[:, None], np.zeros(1), columns, t_obs_ns=0, dt_ns=DT)
    assert chunk.first_index_after(300 * MS) == 6  # action 5 is due exactly now: its time has passed
    assert chunk.first_index_after(300 * MS - 1) == 5
    assert chunk.first_index_after(-5 * MS) == 0 and chunk.first_index_after(10_000 * MS) == 10


def test_positions_pass_unchanged_and_velocities_difference_from_the_observed_state() -> None:
    space = ActionSpace.from_mask([True, False], 2)  # delta column 0 (engine added the state), absolute 1
    columns = command_columns(["j0", "j1"], space.output_kinds, 2)
    state = np.array([1.0, 2.0], np.float32)
    robot = space.to_robot(np.array([[0.1, 2.5], [0.3, 3.0]], np.float32), state)  # what Policy.infer returns
    chunk = plan_chunk(robot, state, columns, t_obs_ns=0, dt_ns=DT)
    np.testing.assert_array_equal(chunk.positions, robot.astype(np.float64))
    np.testing.assert_allclose(chunk.velocities, [[0.1 / 0.05, 0.5 / 0.05], [0.2 / 0.05, 0.5 / 0.05]], rtol=1e-6)


def test_velocity_columns_integrate_from_the_observed_state() -> None:
    space = ActionSpace(("velocity", "velocity", "absolute"))  # DROID-like: joint velocities + a gripper
    columns = command_columns(["j0", "j1", "gripper"], space.output_kinds, 3)
    state = np.array([0.5, -1.0, 0.2])
    actions = np.array([[1.0, 0.0, 0.9], [2.0, -1.0, 0.8], [0.0, 1.0, 0.7]])
    chunk = plan_chunk(actions, state, columns, t_obs_ns=0, dt_ns=DT)
    expected_j0 = 0.5 + 0.05 * np.array([1.0, 3.0, 3.0])
    expected_j1 = -1.0 + 0.05 * np.array([0.0, -1.0, 0.0])
    np.testing.assert_allclose(chunk.positions[:, 0], expected_j0, atol=1e-12)
    np.testing.assert_allclose(chunk.positions[:, 1], expected_j1, atol=1e-12)
    np.testing.assert_array_equal(chunk.velocities[:, :2], actions[:, :2])
    np.testing.assert_array_equal(chunk.positions[:, 2], actions[:, 2])


def test_command_joint_names_pick_and_order_columns() -> None:
    kinds = ActionSpace.uniform("absolute", 3).output_kinds
    columns = command_columns(["a", "b", "c"], kinds, 3, command_names=["c", "a"])
    assert columns.columns == (2, 0) and columns.names == ("c", "a")
    chunk = plan_chunk(np.array([[1.0, 2.0, 3.0]]), np.zeros(3), columns, t_obs_ns=0, dt_ns=DT)
    assert chunk.positions.tolist() == [[3.0, 1.0]]


@pytest.mark.parametrize(("space", "names", "interface", "message"), [
    (ActionSpace.uniform("absolute", 2, joint_space=False), (), "position", "not joint commands"),
    (ActionSpace.uniform("absolute", 2), ("x",), "position", "not action columns"),
    (ActionSpace.uniform("velocity", 2), (), "position", "no state value to integrate"),
    (ActionSpace.uniform("absolute", 2), (), "velocity", "needs its observed state"),
])
def test_columns_that_cannot_be_commanded_are_config_errors(space, names, interface, message) -> None:
    with pytest.raises(ExecutionConfigError, match=message):
        command_columns(["a", "b"], space.output_kinds, 1 if "state" in message else 2, command_names=names,
                        interface=interface)


def test_sample_interpolates_between_due_times_and_is_none_outside() -> None:
    columns = command_columns(["a"], ("position",), 1)
    chunk = plan_chunk(np.array([[0.0], [1.0], [3.0]]), np.zeros(1), columns, t_obs_ns=0, dt_ns=DT)
    assert chunk.sample(50 * MS)[0].tolist() == [0.0]
    assert chunk.sample(75 * MS)[0].tolist() == [0.5]
    assert chunk.sample(137_500_000)[0] == pytest.approx([2.5])
    assert chunk.sample(150 * MS)[0].tolist() == [3.0]
    assert chunk.sample(49 * MS) is None and chunk.sample(151 * MS) is None


@pytest.mark.parametrize(("stamp", "arrival", "issue", "used", "usable"), [
    (1000 * MS, 1010 * MS, None, 1000 * MS, True),
    (0, 1010 * MS, StampIssue.ZERO, 1010 * MS, True),
    (1030 * MS, 1010 * MS, None, 1010 * MS, True),  # within the tolerance: clamped to the arrival
    (2000 * MS, 1010 * MS, StampIssue.FUTURE, 1010 * MS, True),
    (400 * MS, 1010 * MS, StampIssue.PAST, 400 * MS, False),  # 0.61 s old on arrival, max age 0.5
])
def test_stamp_rule(stamp: int, arrival: int, issue, used: int, usable: bool) -> None:
    verdict = judge_stamp(stamp, arrival, future_tolerance_ns=50 * MS, max_age_ns=500 * MS)
    assert (verdict.issue, verdict.stamp_ns, verdict.usable) == (issue, used, usable)
    if issue is not None:
        text = verdict.describe("joint_states")
        assert "'joint_states'" in text and ("clock" in text or "stamp" in text)

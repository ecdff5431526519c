"""What action columns mean: delta columns get the observed state added back, velocities pass through."""

from __future__ import annotations

import numpy as np
import pytest

from pi05_ros.engine.action_space import ABSOLUTE, DELTA, VELOCITY, ActionSpace
from pi05_ros.engine.errors import CheckpointError


def test_openpi_aloha_mask_adds_the_state_to_joints_only() -> None:
    # openpi's AbsoluteActions(make_bool_mask(6, -1, 6, -1)): joints delta, grippers absolute
    space = ActionSpace.from_mask([True] * 6 + [False] + [True] * 6 + [False], 14)
    actions = np.arange(28, dtype=np.float32).reshape(2, 14)
    state = np.full(14, 10.0, np.float32)
    out = space.to_robot(actions, state)
    expected = actions.copy()
    expected[:, [*range(6), *range(7, 13)]] += 10.0
    np.testing.assert_array_equal(out, expected)
    assert space.output_kinds == ("position",) * 14


def test_short_mask_leaves_the_rest_absolute_and_long_mask_is_an_error() -> None:
    assert ActionSpace.from_mask([True, True], 4).kinds == (DELTA, DELTA, ABSOLUTE, ABSOLUTE)
    with pytest.raises(CheckpointError, match="at most 3"):
        ActionSpace.from_mask([True] * 4, 3)


def test_droid_velocities_pass_through_and_are_reported() -> None:
    space = ActionSpace((VELOCITY,) * 7 + (ABSOLUTE,))
    actions = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(space.to_robot(actions, np.ones(8)), actions)
    assert space.output_kinds == ("velocity",) * 7 + ("position",)


def test_delta_without_a_state_value_is_a_startup_error() -> None:
    space = ActionSpace.from_mask([True] * 8, 8)
    with pytest.raises(CheckpointError, match=r"column\(s\) \[7\] are deltas but the state has only 7"):
        space.check_state(7)
    ActionSpace.from_mask([True] * 7, 8).check_state(7)  # the gripper absolute: fine


def test_non_joint_columns_are_other_and_unknown_kinds_rejected() -> None:
    assert ActionSpace.uniform(DELTA, 7, joint_space=False).output_kinds == ("other",) * 7
    with pytest.raises(CheckpointError, match="unknown action kind"):
        ActionSpace(("torque",))
    assert ActionSpace.uniform(VELOCITY, 3).describe() == "3 x velocity"

"""What the columns of an action chunk mean, and turning the model's actions into the robot's terms.

A checkpoint is trained on actions of one of three kinds per column:
- ``absolute``: a joint position (or gripper position) target;
- ``delta``: a position relative to the state at the observation (openpi's DeltaActions / LeRobot's relative
  actions); the policy's output adds the observed state back, so these columns leave the engine as positions;
- ``velocity``: a joint velocity (openpi's DROID model: 7 joint velocities + an absolute gripper).

`joint_space` is False when the columns are not joint commands at all (LIBERO's end-effector deltas): such a
chunk can be published but must not drive a joint controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.errors import CheckpointError

ABSOLUTE, DELTA, VELOCITY = "absolute", "delta", "velocity"
KINDS = (ABSOLUTE, DELTA, VELOCITY)
# What a column is once the policy has added the state back to delta columns.
POSITION, OUTPUT_VELOCITY, OTHER = "position", "velocity", "other"


@dataclass(frozen=True)
class ActionSpace:
    """Per action column: the kind the checkpoint was trained on; and which state value a delta column is
    relative to (`state_index`, default: the same index)."""

    kinds: tuple[str, ...]
    joint_space: bool = True
    state_index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise CheckpointError(f"unknown action kind(s) {bad}; each column is one of {', '.join(KINDS)}")
        if self.state_index is not None and len(self.state_index) != len(self.kinds):
            raise CheckpointError(f"state_index has {len(self.state_index)} entries for {len(self.kinds)} action "
                                  "columns; give one state index per action column")

    @classmethod
    def uniform(cls, kind: str, dof: int, joint_space: bool = True) -> ActionSpace:
        return cls((kind,) * dof, joint_space)

    @classmethod
    def from_mask(cls, mask: Sequence[bool], dof: int, relative: str = DELTA,
                  joint_space: bool = True) -> ActionSpace:
        """openpi's make_bool_mask / LeRobot's relative-action mask: True = `relative` (delta), False = absolute.

        A mask shorter than the action dimension leaves the remaining columns absolute, as openpi's
        DeltaActions does; a longer one is an error.
        """
        mask = [bool(m) for m in mask]
        if len(mask) > dof:
            raise CheckpointError(f"action_space_mask has {len(mask)} entries but the policy outputs {dof} "
                                  f"actions; give at most {dof}")
        kinds = tuple(relative if m else ABSOLUTE for m in mask) + (ABSOLUTE,) * (dof - len(mask))
        return cls(kinds, joint_space)

    @property
    def dof(self) -> int:
        return len(self.kinds)

    @property
    def output_kinds(self) -> tuple[str, ...]:
        """Per column of `to_robot`'s result: position, velocity, or other (not a joint command)."""
        if not self.joint_space:
            return (OTHER,) * self.dof
        return tuple(OUTPUT_VELOCITY if k == VELOCITY else POSITION for k in self.kinds)

    def delta_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(action columns that are deltas, the state index each is relative to)."""
        cols = np.array([i for i, k in enumerate(self.kinds) if k == DELTA], dtype=np.int64)
        index = np.array(self.state_index, dtype=np.int64)[cols] if self.state_index is not None else cols
        return cols, index

    def check_state(self, state_dim: int) -> None:
        """A delta column needs a state value to be relative to: a startup error otherwise."""
        cols, index = self.delta_columns()
        missing = [int(c) for c, s in zip(cols, index, strict=True) if not 0 <= s < state_dim]
        if missing:
            raise CheckpointError(
                f"action column(s) {missing} are deltas but the state has only {state_dim} values; make them "
                "absolute (action_space_mask) or give the state the joints they are relative to")

    def to_robot(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """actions [horizon, dof] (un-normalized) -> robot terms: the observed state added to delta columns."""
        cols, index = self.delta_columns()
        if not len(cols):
            return actions
        out = np.array(actions, dtype=np.float32, copy=True)
        out[:, cols] += np.asarray(state, dtype=np.float32)[index]
        return out

    def from_robot(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """The inverse of `to_robot`: the state subtracted from delta columns (positions back to deltas)."""
        cols, index = self.delta_columns()
        out = np.array(actions, dtype=np.float32, copy=True)
        if len(cols):
            out[:, cols] -= np.asarray(state, dtype=np.float32)[index]
        return out

    def describe(self) -> str:
        if len(set(self.kinds)) == 1:
            text = f"{self.dof} x {self.kinds[0]}"
        else:
            text = ", ".join(f"{i}:{k}" for i, k in enumerate(self.kinds))
        return text + ("" if self.joint_space else " (not joint space)")

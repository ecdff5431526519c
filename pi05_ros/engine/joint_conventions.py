"""Robot joint conventions a checkpoint was trained in, where they differ from the robot's own.

openpi's ALOHA policies (`policies/aloha_policy.py`, `adapt_to_pi=True`, the default of every ALOHA config, so also
`pi05_aloha`) were trained in "pi's" joint space: before normalization the state's joints 1, 2, 8 and 9 are
flipped and each gripper's linear position is turned into the angle of pi's own gripper, normalized to [0, 1];
after the state is added back to the delta columns the actions are flipped again and each gripper is turned into
ALOHA's gripper joint, normalized. A checkpoint trained that way gives wrong signs and gripper values unless both
steps run, so the `pi05_aloha` preset selects `aloha_to_pi` (engine/config.py) and `joint_convention` overrides it.

`state_to_model` runs on the robot's state before normalization, the prompt's discretized state and the delta
columns; `actions_to_robot` on the actions once the state is added back; `actions_to_model` undoes it (for real-time
chunking's previous chunk, robot units -> model units).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.errors import CheckpointError, InputError

NONE, ALOHA_TO_PI = "none", "aloha_to_pi"
JOINT_CONVENTIONS = (NONE, ALOHA_TO_PI)

# ALOHA: [left arm 6 joints, left gripper, right arm 6 joints, right gripper]
ALOHA_DIM = 14
ALOHA_GRIPPERS = [6, 13]
ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
# The constants of openpi's aloha_policy.py (from the ALOHA and Interbotix code, and pi's own gripper's range)
PUPPET_GRIPPER_POSITION = (0.01844, 0.05800)  # linear gripper position, open .. closed
GRIPPER_ARM_LENGTH, GRIPPER_HORN_RADIUS = 0.036, 0.022
PI_GRIPPER_RADIANS = (0.5476, 1.6296)  # pi's gripper angle, normalized to [0, 1] over this range
PUPPET_GRIPPER_JOINT = (-0.6213, 1.4910)  # ALOHA's gripper joint, open .. closed


def _normalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (x - lo) / (hi - lo)


def _unnormalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return x * (hi - lo) + lo


def aloha_gripper_to_pi(value: np.ndarray) -> np.ndarray:
    """ALOHA's normalized linear gripper position -> pi's normalized gripper angle."""
    linear = _unnormalize(value, *PUPPET_GRIPPER_POSITION)
    cosine_rule = ((GRIPPER_HORN_RADIUS ** 2 + linear ** 2 - GRIPPER_ARM_LENGTH ** 2)
                   / (2 * GRIPPER_HORN_RADIUS * linear))
    return _normalize(np.arcsin(np.clip(cosine_rule, -1.0, 1.0)), *PI_GRIPPER_RADIANS)


def pi_gripper_to_aloha(value: np.ndarray) -> np.ndarray:
    """A predicted gripper value (radians above pi's open angle) -> ALOHA's normalized gripper joint."""
    return _normalize(value + PI_GRIPPER_RADIANS[0], *PUPPET_GRIPPER_JOINT)


def aloha_gripper_to_model(value: np.ndarray) -> np.ndarray:
    """The inverse of `pi_gripper_to_aloha`."""
    return _unnormalize(value, *PUPPET_GRIPPER_JOINT) - PI_GRIPPER_RADIANS[0]


@dataclass(frozen=True)
class JointConvention:
    name: str

    @property
    def identity(self) -> bool:
        return self.name == NONE

    def check(self, state_dim: int, max_state_values: int, action_dof: int) -> None:
        """A convention made for one robot needs that robot's state and actions: a startup error otherwise. The
        state takes state_dim .. max_state_values values (padded norm stats: policy.py)."""
        if self.name == ALOHA_TO_PI and not (state_dim <= ALOHA_DIM <= max_state_values
                                              and action_dof == ALOHA_DIM):
            states = str(state_dim) if state_dim == max_state_values else f"{state_dim}..{max_state_values}"
            raise CheckpointError(
                f"joint_convention {ALOHA_TO_PI} (the pi05_aloha preset's) needs ALOHA's {ALOHA_DIM} state values "
                f"and {ALOHA_DIM} action columns, but the norm stats / policy give {states} and {action_dof}; "
                f"use the norm stats of an ALOHA checkpoint, or joint_convention={NONE} for another robot")

    def state_to_model(self, state: np.ndarray) -> np.ndarray:
        if self.name == NONE:
            return state
        out = np.asarray(state, dtype=np.float64).copy()
        if out.shape[-1] != ALOHA_DIM:
            raise InputError(f"joint_convention {ALOHA_TO_PI} needs ALOHA's {ALOHA_DIM} state values, got "
                             f"{out.shape[-1]}; send [left arm 6, left gripper, right arm 6, right gripper]")
        out *= ALOHA_JOINT_FLIP
        out[ALOHA_GRIPPERS] = aloha_gripper_to_pi(out[ALOHA_GRIPPERS])
        return out.astype(np.float32)

    def actions_to_robot(self, actions: np.ndarray) -> np.ndarray:
        return self._flip_actions(actions, pi_gripper_to_aloha)

    def actions_to_model(self, actions: np.ndarray) -> np.ndarray:
        return self._flip_actions(actions, aloha_gripper_to_model)

    def _flip_actions(self, actions: np.ndarray, gripper: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """ALOHA's joint flips (their own inverse) and `gripper` on the gripper columns; as they are for none."""
        if self.name == NONE:
            return actions
        out = np.asarray(actions, dtype=np.float64) * ALOHA_JOINT_FLIP
        out[:, ALOHA_GRIPPERS] = gripper(out[:, ALOHA_GRIPPERS])
        return out.astype(np.float32)

    def describe(self) -> str:
        return {NONE: "none: the robot's joints as they come",
                ALOHA_TO_PI: "aloha_to_pi: joints 1, 2, 8, 9 flipped and the grippers converted to pi's gripper "
                             "angle on the way in, and back on the way out (openpi's adapt_to_pi)"}[self.name]


def joint_convention(name: str | None) -> JointConvention:
    name = name or NONE
    if name not in JOINT_CONVENTIONS:
        raise CheckpointError(f"unknown joint_convention {name!r}; choose one of {', '.join(JOINT_CONVENTIONS)} "
                              "(or leave it empty for the checkpoint's / preset's own)")
    return JointConvention(name)


def example_state_length(convention: str, state_dim: int, max_state_values: int,
                         delta_state_index: Iterable[int] = ()) -> int:
    """How many values a warm-up state has: what the robot sends (state_dim, the unpadded length: the prompt's
    state tokens, and so the text tiles warmed, are the real requests'), longer only where a delta column refers
    to a later value; ALOHA's 14 under aloha_to_pi."""
    if convention == ALOHA_TO_PI:
        return ALOHA_DIM
    needed = max((int(i) + 1 for i in delta_state_index), default=0)
    return min(max(state_dim, needed), max_state_values)

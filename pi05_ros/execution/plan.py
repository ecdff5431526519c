"""A chunk in command terms.

Action k of a chunk is meant for `t_obs + (k + 1) * action_dt` (t_obs = the newest observation stamp used):
a position column is where the joint should be at that time; a velocity column is the velocity over the
period that ends then. For each commanded joint the plan holds both:
- position columns: the positions as they are; velocities by differencing, starting from the state observed
  at t_obs: v_k = (p_k - p_{k-1}) / dt with p_{-1} = the observed state (zero when the column has no state);
- velocity columns: the velocities as they are; positions integrated from the observed state:
  p_k = q_obs + dt * (v_0 + ... + v_k).
Delta columns arrive from the engine already turned into positions (engine/action_space.py). Between due times
a plan is sampled by linear interpolation. No ROS imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.action_space import OTHER, OUTPUT_VELOCITY, POSITION

NS_PER_S = 1_000_000_000


class ExecutionConfigError(ValueError):
    """Parameters and a model that cannot drive a robot together; str() names the cause and the fix."""


def seconds_to_ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


def due_ns(t_obs_ns: int, k: int | np.ndarray, dt_ns: int) -> int | np.ndarray:
    """When action k of a chunk observed at t_obs is meant to happen: t_obs + (k + 1) * dt."""
    return t_obs_ns + (np.asarray(k) + 1) * dt_ns if isinstance(k, np.ndarray) else t_obs_ns + (k + 1) * dt_ns


@dataclass(frozen=True)
class CommandColumns:
    """The commanded joints in the order commands carry them (forward_command_controller takes no names: this
    order must be its `joints`), the action column behind each, its output kind and its state index."""

    names: tuple[str, ...]
    columns: tuple[int, ...]
    kinds: tuple[str, ...]  # POSITION or OUTPUT_VELOCITY
    state_index: tuple[int | None, ...]  # which state value the joint's observed position is; None: none

    def measured(self, state: np.ndarray | None) -> np.ndarray:
        """The command joints' positions in a state vector (NaN where a joint has no state value)."""
        out = np.full(len(self.names), np.nan)
        if state is not None:
            for j, index in enumerate(self.state_index):
                if index is not None and index < len(state):
                    out[j] = float(state[index])
        return out


def command_columns(action_names: Sequence[str], output_kinds: Sequence[str], state_dim: int,
                    command_names: Sequence[str] = (), state_index: Sequence[int] | None = None,
                    interface: str = "position") -> CommandColumns:
    """The commanded joints for a model whose action columns are `action_names` with `output_kinds`
    (ActionSpace.output_kinds). `command_names` picks and orders them (empty: every column). Raises
    ExecutionConfigError when they cannot be commanded: not joint space, an unknown name, or a column that
    needs the observed state (a velocity to integrate into positions, a position to turn into a velocity for
    a velocity interface) but has none."""
    names = tuple(command_names) or tuple(action_names)
    unknown = [n for n in names if n not in action_names]
    if unknown:
        raise ExecutionConfigError(
            f"command_joint_names lists {unknown}, which are not action columns {list(action_names)}; "
            "name only action columns (action_joint_names), in the order of the controller's `joints`")
    if len(set(names)) != len(names):
        raise ExecutionConfigError(f"command_joint_names names a joint twice: {list(names)}")
    columns = tuple(list(action_names).index(n) for n in names)
    kinds = tuple(output_kinds[c] for c in columns)
    if OTHER in kinds:
        raise ExecutionConfigError(
            "this checkpoint's actions are not joint commands (e.g. end-effector deltas): the node publishes "
            "action_chunk only. Convert them to joint targets yourself (inverse kinematics) and command those")
    index = tuple(state_index) if state_index is not None else tuple(range(len(action_names)))
    states = tuple(index[c] if 0 <= index[c] < state_dim else None for c in columns)
    for name, kind, state in zip(names, kinds, states, strict=True):
        if state is not None:
            continue
        if kind == OUTPUT_VELOCITY:
            raise ExecutionConfigError(
                f"action column '{name}' is a velocity but has no state value to integrate positions from; "
                "give the state that joint (state_joint_names) or leave it out of command_joint_names")
        if interface == "velocity":
            raise ExecutionConfigError(
                f"action column '{name}' is a position and the velocity interface needs its observed state to "
                "turn it into a velocity; give the state that joint or leave it out of command_joint_names")
    return CommandColumns(names, columns, kinds, states)


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk's commands for the command joints, on its own time grid (see the module docstring)."""

    t_obs_ns: int
    dt_ns: int
    positions: np.ndarray  # [horizon, joints] float64
    velocities: np.ndarray  # [horizon, joints] float64
    actions: np.ndarray  # [horizon, dof] float64: the whole action rows, robot units (for a later RTC prefix)
    sequence: int = 0

    @property
    def horizon(self) -> int:
        return int(self.positions.shape[0])

    def due_ns(self, k: int) -> int:
        return self.t_obs_ns + (k + 1) * self.dt_ns

    @property
    def first_due_ns(self) -> int:
        return self.due_ns(0)

    @property
    def last_due_ns(self) -> int:
        return self.due_ns(self.horizon - 1)

    def first_index_after(self, t_ns: int) -> int:
        """The first action whose due time is later than `t_ns` (horizon when none is)."""
        k = (t_ns - self.t_obs_ns) // self.dt_ns  # due_k > t  <=>  k + 1 > (t - t_obs) / dt
        return int(min(max(k, 0), self.horizon))

    def sample(self, t_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(positions, velocities, action row) at `t_ns`, interpolated linearly between due times; None outside
        [first due, last due]."""
        if t_ns < self.first_due_ns or t_ns > self.last_due_ns:
            return None
        offset = t_ns - self.first_due_ns
        k, rest = divmod(offset, self.dt_ns)
        if rest == 0 or k + 1 >= self.horizon:
            k = min(k, self.horizon - 1)
            return self.positions[k].copy(), self.velocities[k].copy(), self.actions[k].copy()
        w = rest / self.dt_ns
        return tuple((1.0 - w) * a[k] + w * a[k + 1] for a in (self.positions, self.velocities, self.actions))


def plan_chunk(actions: np.ndarray, state: np.ndarray | None, columns: CommandColumns, *, t_obs_ns: int,
               dt_ns: int, sequence: int = 0) -> PlannedChunk:
    """The commands of one chunk: actions [horizon, dof] in robot units (engine ActionChunk.actions) and the
    state observed at t_obs (ActionChunk.state)."""
    actions = np.asarray(actions, dtype=np.float64)
    horizon = actions.shape[0]
    dt = dt_ns / NS_PER_S
    positions = np.empty((horizon, len(columns.names)), np.float64)
    velocities = np.empty_like(positions)
    observed = None if state is None else np.asarray(state, dtype=np.float64)
    for j, (column, kind, index) in enumerate(zip(columns.columns, columns.kinds, columns.state_index,
                                                  strict=True)):
        values = actions[:, column]
        start = observed[index] if observed is not None and index is not None else None
        if kind == POSITION:
            positions[:, j] = values
            before = values[0] if start is None else start
            velocities[:, j] = np.diff(values, prepend=before) / dt
        else:
            if start is None:
                raise ExecutionConfigError(f"velocity column '{columns.names[j]}' needs the observed state")
            velocities[:, j] = values
            positions[:, j] = start + dt * np.cumsum(values)
    return PlannedChunk(t_obs_ns, dt_ns, positions, velocities, actions, sequence)

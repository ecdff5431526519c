"""Joint limits and the clipping of commands against them.

Per joint: a position range, a maximum speed and (optionally) a maximum acceleration; a missing limit is
infinite. Position commands p*_k, one control period dt apart, after the previous command p_{k-1} moving at
v_{k-1}, are clipped in this order:
    v = (p*_k - p_{k-1}) / dt
    v = clip(v, v_{k-1} - a_max dt, v_{k-1} + a_max dt)      acceleration
    v = clip(v, -v_max, v_max)                               velocity
    p_k = clip(p_{k-1} + v dt, min_position, max_position)   position (last: it is the hard one; a p_{k-1}
                                                             already outside widens the range to itself)
Velocity commands v*_k (a velocity interface) from the estimated position p: acceleration and velocity as
above, then v = clip(v, (min_position - p) / dt, (max_position - p) / dt) so the joint stays in range.
A value no limit changes is returned bit for bit. Where no previous command is known (NaN), only the position
(and velocity magnitude) limits apply. No ROS imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

INF = math.inf


@dataclass(frozen=True)
class JointLimit:
    min_position: float = -INF
    max_position: float = INF
    max_velocity: float = INF
    max_acceleration: float = INF

    def merged(self, override: JointLimit) -> JointLimit:
        """This limit with every finite value of `override` replacing its own."""
        values = {}
        for name in ("min_position", "max_position", "max_velocity", "max_acceleration"):
            mine, theirs = getattr(self, name), getattr(override, name)
            values[name] = theirs if math.isfinite(theirs) else mine
        return JointLimit(**values)


@dataclass
class ClipCounts:
    """How many joint values the limits changed, by limit, and how many commands (rows) had any."""

    values: int = 0  # joint values checked
    commands: int = 0  # commands (rows) checked
    clipped_commands: int = 0
    position: int = 0
    velocity: int = 0
    acceleration: int = 0

    def add(self, other: ClipCounts) -> None:
        for name in ("values", "commands", "clipped_commands", "position", "velocity", "acceleration"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class JointLimits:
    names: tuple[str, ...]
    min_position: np.ndarray = field(repr=False)
    max_position: np.ndarray = field(repr=False)
    max_velocity: np.ndarray = field(repr=False)
    max_acceleration: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, names: Sequence[str], limits: Mapping[str, JointLimit]) -> JointLimits:
        rows = [limits.get(name, JointLimit()) for name in names]

        def column(attribute: str) -> np.ndarray:
            return np.array([getattr(row, attribute) for row in rows], dtype=np.float64)

        low, high = column("min_position"), column("max_position")
        bad = [n for n, lo, hi in zip(names, low, high, strict=True) if not lo <= hi]  # NaN fails it too
        if bad:
            raise ValueError(f"joint(s) {bad} have min_position > max_position or a NaN bound; fix the limits")
        for attribute in ("max_velocity", "max_acceleration"):
            negative = [n for n, v in zip(names, column(attribute), strict=True) if not v > 0]
            if negative:
                raise ValueError(f"joint(s) {negative} have {attribute} <= 0 or NaN; give a positive value or none")
        return cls(tuple(names), low, high, column("max_velocity"), column("max_acceleration"))

    @classmethod
    def none(cls, names: Sequence[str]) -> JointLimits:
        return cls.of(names, {})

    def limit(self, name: str) -> JointLimit:
        i = self.names.index(name)
        return JointLimit(float(self.min_position[i]), float(self.max_position[i]), float(self.max_velocity[i]),
                          float(self.max_acceleration[i]))

    @property
    def any(self) -> bool:
        return bool(np.isfinite(np.concatenate([self.min_position, self.max_position, self.max_velocity,
                                                self.max_acceleration])).any())


def clip_positions(desired: np.ndarray, previous: np.ndarray, previous_velocity: np.ndarray,
                   limits: JointLimits, dt_s: float,
                   first_dt_s: float | None = None) -> tuple[np.ndarray, np.ndarray, ClipCounts]:
    """Position commands [steps, joints], one period apart, after `previous` (positions, NaN: unknown) moving at
    `previous_velocity` (NaN: unknown). `first_dt_s`: the time from `previous` to the first command when it is not
    a period (a trajectory that replaces another now, its first point due later). A previous position outside the
    range may stay there or move back at the rate limits, never further out, and is never snapped into the range.
    Returns (positions, velocities, counts); see the module docstring."""
    desired = np.asarray(desired, dtype=np.float64)
    out = desired.copy()
    velocities = np.full_like(out, np.nan)
    counts = ClipCounts(values=desired.size, commands=desired.shape[0])
    p_prev = np.array(previous, dtype=np.float64)
    v_prev = np.array(previous_velocity, dtype=np.float64)
    period_s = dt_s
    for k in range(desired.shape[0]):
        dt_s = first_dt_s if k == 0 and first_dt_s is not None else period_s
        target = desired[k]
        known = np.isfinite(p_prev)
        v = np.where(known, (target - p_prev) / dt_s, np.nan)
        v_unclipped = v.copy()
        accel_known = known & np.isfinite(v_prev) & np.isfinite(limits.max_acceleration)
        step = limits.max_acceleration * dt_s
        v = np.where(accel_known, np.clip(v, v_prev - step, v_prev + step), v)
        by_acceleration = accel_known & (v != v_unclipped)
        v_before_speed = v.copy()
        v = np.where(known, np.clip(v, -limits.max_velocity, limits.max_velocity), v)
        by_velocity = known & (v != v_before_speed)
        rate_limited = by_acceleration | by_velocity
        p = np.where(rate_limited, p_prev + v * dt_s, target)
        # out of range already (a robot resting past its URDF bound): the range widens to where it is
        low = np.where(known, np.minimum(limits.min_position, p_prev), limits.min_position)
        high = np.where(known, np.maximum(limits.max_position, p_prev), limits.max_position)
        p_clipped = np.clip(p, low, high)
        by_position = p_clipped != p
        out[k] = p_clipped
        changed = rate_limited | by_position
        velocities[k] = np.where(known, np.where(changed, (p_clipped - p_prev) / dt_s, v_unclipped), np.nan)
        counts.acceleration += int(by_acceleration.sum())
        counts.velocity += int(by_velocity.sum())
        counts.position += int(by_position.sum())
        counts.clipped_commands += int(changed.any())
        p_prev, v_prev = out[k], velocities[k]
    return out, velocities, counts


def clip_velocities(desired: np.ndarray, position: np.ndarray, previous_velocity: np.ndarray,
                    limits: JointLimits, dt_s: float) -> tuple[np.ndarray, np.ndarray, ClipCounts]:
    """Velocity commands [steps, joints] from the estimated `position` (NaN: unknown) after
    `previous_velocity` (NaN: unknown). Returns (velocities, predicted positions, counts)."""
    desired = np.asarray(desired, dtype=np.float64)
    out = desired.copy()
    positions = np.full_like(out, np.nan)
    counts = ClipCounts(values=desired.size, commands=desired.shape[0])
    p = np.array(position, dtype=np.float64)
    v_prev = np.array(previous_velocity, dtype=np.float64)
    for k in range(desired.shape[0]):
        v = desired[k].copy()
        accel_known = np.isfinite(v_prev) & np.isfinite(limits.max_acceleration)
        step = limits.max_acceleration * dt_s
        v_new = np.where(accel_known, np.clip(v, v_prev - step, v_prev + step), v)
        by_acceleration = v_new != v
        v = v_new
        v_new = np.clip(v, -limits.max_velocity, limits.max_velocity)
        by_velocity = v_new != v
        v = v_new
        known = np.isfinite(p)
        low = np.where(known, (limits.min_position - p) / dt_s, -INF)
        high = np.where(known, (limits.max_position - p) / dt_s, INF)
        v_new = np.clip(v, np.minimum(low, 0.0), np.maximum(high, 0.0))
        by_position = v_new != v
        out[k] = v_new
        positions[k] = p + v_new * dt_s
        counts.acceleration += int(by_acceleration.sum())
        counts.velocity += int(by_velocity.sum())
        counts.position += int(by_position.sum())
        counts.clipped_commands += int((by_acceleration | by_velocity | by_position).any())
        p, v_prev = positions[k], out[k]
    return out, positions, counts

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
(and velocity magnitude) limits apply.

A hold brakes (`braking_step`, `braking`): from the last segment velocity u, every joint with a max_acceleration
slows by the same factor each period, u_k = u_{k-1} * max(0, 1 - dt / T) with T = max_j |u_j| / a_max_j, so the
joint that needs longest at its limit decelerates at exactly that limit, the others less, and the motion keeps its
direction in joint space until it rests T later (T shrinks by dt a period); positions p_k = p_{k-1} + u_k dt,
clipped to the range as above (a range bound overrides the acceleration limit: that joint stops at the bound).
A joint without a max_acceleration stops at once (nothing bounds its deceleration, and it moves on stale data
no further). No ROS imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

INF = math.inf
MAX_BRAKING_PERIODS = 1000  # the longest hold trajectory, in periods (20 s at 50 Hz)


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

    def range_from(self, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): the position range for a move from `position`, widened to where a joint already is when it
        is outside (a robot resting past its URDF bound may stay or come back, never go further out); NaN: the
        range as it is."""
        known = np.isfinite(position)
        return (np.where(known, np.minimum(self.min_position, position), self.min_position),
                np.where(known, np.maximum(self.max_position, position), self.max_position))

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
        low, high = limits.range_from(p_prev)
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


def _braking_speeds(velocity: np.ndarray, limits: JointLimits, within_s: float) -> tuple[np.ndarray, float]:
    """(speeds, T): the speeds a stop starts from (unknown ones count as rest; a joint without an acceleration limit
    may stop at once, and does) and the time to rest, T = max_j |u_j| / a_max_j, at most `within_s`."""
    u = np.asarray(velocity, dtype=np.float64)
    u = np.where(np.isfinite(u) & np.isfinite(limits.max_acceleration), u, 0.0)
    moving = u != 0.0
    stop_s = float(np.max(np.abs(u[moving]) / limits.max_acceleration[moving])) if moving.any() else 0.0
    return u, min(stop_s, within_s)


def braking_step(position: np.ndarray, velocity: np.ndarray, limits: JointLimits, dt_s: float,
                 within_s: float = INF) -> tuple[np.ndarray, np.ndarray, ClipCounts]:
    """One period of a controlled stop from `position` (NaN: unknown, stays unknown) moving at `velocity` (the last
    segment's or velocity command's; NaN: unknown, taken as at rest): (position, velocity) at its end and what the
    position range clipped; see the module docstring. The ramp ends within `within_s` (decelerating harder than
    max_acceleration where the limit would need longer). Velocities reach exactly 0 at the end."""
    p = np.array(position, dtype=np.float64)
    u, stop_s = _braking_speeds(velocity, limits, within_s)
    # the last period of the ramp (and float rounding at its end) stops exactly
    scale = 1.0 - dt_s / stop_s if stop_s > dt_s * (1 + 1e-9) else 0.0
    u_next = u * scale
    p_next = p + u_next * dt_s
    low, high = limits.range_from(p)
    clipped = np.isfinite(p) & ((p_next < low) | (p_next > high))
    p_next = np.where(clipped, np.clip(p_next, low, high), p_next)
    u_next = np.where(clipped, (p_next - p) / dt_s, u_next)
    counts = ClipCounts(values=p.size, commands=1, clipped_commands=int(clipped.any()), position=int(clipped.sum()))
    return p_next, u_next, counts


def braking(position: np.ndarray, velocity: np.ndarray, limits: JointLimits,
            dt_s: float) -> tuple[np.ndarray, np.ndarray, ClipCounts]:
    """A whole controlled stop, one row a period: (positions, velocities) [periods, joints] until every joint rests
    (the last row's velocities are 0, and its positions the row's before), and what the position range clipped:
    braking_step repeated, in closed form (u_k = u_0 (1 - k dt / T)) so that a chunk's tail costs microseconds
    inside the command margin; stepwise where the range clips. Joints at rest, or without an acceleration limit,
    give one row: the hold at `position`. A stop that would take longer than MAX_BRAKING_PERIODS (a speed far beyond
    max_acceleration's reach) ramps down harder, to end at rest within them, so a hold trajectory stays a message of
    bounded size."""
    p0 = np.asarray(position, dtype=np.float64)
    u0, stop_s = _braking_speeds(velocity, limits, MAX_BRAKING_PERIODS * dt_s)
    periods = max(1, math.ceil(stop_s / dt_s - 1e-9))
    elapsed = np.arange(1, periods + 1) * dt_s
    # braking_step's exact stop in its last period (and float rounding there)
    left = np.where(elapsed < stop_s - dt_s * 1e-9, 1.0 - elapsed / max(stop_s, dt_s), 0.0)
    velocities = left[:, None] * u0[None, :]
    positions = p0[None, :] + np.cumsum(velocities * dt_s, axis=0)
    low, high = limits.range_from(p0)
    if (np.isfinite(p0) & ((positions < low) | (positions > high))).any():
        return braking_by_steps(position, velocity, limits, dt_s)
    return positions, velocities, ClipCounts(values=positions.size, commands=periods)


def braking_by_steps(position: np.ndarray, velocity: np.ndarray, limits: JointLimits,
                     dt_s: float) -> tuple[np.ndarray, np.ndarray, ClipCounts]:
    """`braking` by repeating braking_step (its definition; what it runs where the position range clips)."""
    rows_p, rows_u = [], []
    counts = ClipCounts()
    p, u = np.asarray(position, dtype=np.float64), np.asarray(velocity, dtype=np.float64)
    while True:
        p, u, step = braking_step(p, u, limits, dt_s, within_s=(MAX_BRAKING_PERIODS - len(rows_p)) * dt_s)
        counts.add(step)
        rows_p.append(p)
        rows_u.append(u)
        if not u.any():
            return np.stack(rows_p), np.stack(rows_u), counts

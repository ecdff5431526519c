"""What the node commands, in both execution modes, and when it holds or stops instead.

Chunk mode (`execution: chunk`, for joint_trajectory_controller): each chunk becomes one trajectory stamped
with t_obs, point k at time_from_start (k + 1) * dt, so JTC runs every point at its intended time
(FACTS/ros_node.md: JTC keeps a past stamp and samples at `now`). Points due before now + `command_margin_s`
are dropped (JTC would jump onto the trajectory at `now` instead of blending into its first point), and so are
points due after t_obs + max_input_age_s + dt: no policy action runs on stale data beyond that bound. Where
max_acceleration is set, points after the last bring its motion to rest (limits.braking), so a trajectory that
no chunk replaces ends in a stop within the limits, not within one segment. At every
control tick the commander checks the situation; when commanding must stop it publishes one hold (stamped now: a
trajectory from the position and velocity the last trajectory commands at now + command_margin_s to rest, braking
at max_acceleration (limits.py); stamp 0, one point at the position commanded now, where nothing is to be braked:
at rest, or without acceleration limits) with `on_stale: hold`, nothing
with `stop` (JTC then ends the bounded trajectory, braking tail included, and keeps its last point). A chunk with
no action left inside those bounds (it came too late) holds the same way and says so until a chunk runs.

Stream mode (`execution: stream`): chunks merge into the StreamQueue; every tick publishes one command (the
target at the end of the coming period). A tick without a fresh queued command (none, or one whose
observation is older than max_input_age_s + dt) holds: one period of braking from the last command (limits.py;
at once, the last commanded position and zero velocity, without acceleration limits); with `stop` it publishes
nothing (refused at startup for a velocity interface: forward_command_controller keeps its last velocity).
Deactivation's hold stops at once: nothing is published after it, and a velocity controller would keep a
braking velocity.

Every command passes the joint limits (limits.py). What was commanded is forgotten while commanding is off and
when the ROS clock goes back, so the next command starts from the robot's own position. Counters and timings for
/diagnostics are in ExecutionStats. No ROS imports; the node calls `on_chunk` from the inference thread and
`on_tick` from the control loop.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pi05_ros.execution.blend import BlendSettings
from pi05_ros.execution.limits import (
    MAX_BRAKING_PERIODS,
    ClipCounts,
    JointLimits,
    braking,
    braking_step,
    clip_positions,
    clip_velocities,
)
from pi05_ros.execution.loop import summarize
from pi05_ros.execution.plan import NS_PER_S, PlannedChunk
from pi05_ros.execution.queue import StreamQueue

CHUNK, STREAM = "chunk", "stream"
EXECUTION_MODES = (CHUNK, STREAM)
TRAJECTORY, POSITION_INTERFACE, VELOCITY_INTERFACE = "trajectory", "position", "velocity"
COMMAND_INTERFACES = (TRAJECTORY, POSITION_INTERFACE, VELOCITY_INTERFACE)
HOLD, STOP = "hold", "stop"
ON_STALE = (HOLD, STOP)
# States shown on /diagnostics
IDLE, WAITING, COMMANDING, HOLDING, STOPPED = "idle", "waiting for a chunk", "commanding", "holding", "stopped"
WINDOW = 200  # timings and clip fractions over the last this many chunks / commands
# The ROS clock going back by more than this (sim reset, looped bag) voids earlier commands (the inputs' own
# tolerance, ros/observation.py: a wall clock's small steps do not)
CLOCK_BACK_TOLERANCE_NS = 50_000_000
FREQUENT_CLIPPING = 0.1  # more than this fraction of recent commands clipped: WARN


@dataclass(frozen=True)
class Situation:
    """What the node knows at one moment."""

    now_ns: int  # ROS clock
    commanding: bool  # lifecycle active and commands allowed (a demo model needs allow_demo_commands)
    stop_reason: str | None = None  # why motion must stop now (stale input, failed inference, ...); None: go
    measured: np.ndarray | None = None  # measured positions of the command joints (NaN: unknown)


@dataclass(frozen=True)
class ChunkTiming:
    """When the chunk's observation was taken and used, for /diagnostics."""

    started_ns: int  # ROS clock when its inference started
    latency_s: float  # inference wall time


@dataclass(frozen=True)
class TrajectoryCommand:
    stamp_ns: int  # header.stamp (0: start on arrival)
    times_from_start_ns: tuple[int, ...]
    positions: np.ndarray  # [points, joints]
    hold: bool = False
    first_action: int = -1  # index of the chunk action of the first point (-1 for a hold)
    braking_points: int = 0  # the last this many points bring the motion to rest (limits.braking): not the chunk's


@dataclass(frozen=True)
class PointCommand:
    tick_ns: int  # when it is published (header.stamp of a one-point trajectory)
    target_ns: int  # the end of the period it commands (tick + period)
    positions: np.ndarray  # [joints]
    velocities: np.ndarray  # [joints]
    hold: bool = False


@dataclass(frozen=True)
class ExecutionStatus:
    mode: str
    interface: str
    on_stale: str
    blend: str
    state: str
    reason: str | None
    commands: int
    holds: int
    chunks: int
    skipped_late_total: int
    skipped_late_last: int | None
    no_action_left: int  # chunks with no action inside the stale bound
    starved_ticks: int  # stream: ticks with nothing queued
    too_old_ticks: int  # stream: ticks whose queued command was too old
    queue_length: int
    clipped: ClipCounts
    clipped_recent_fraction: float
    obs_age_at_start_ms: dict[str, float]
    latency_ms: dict[str, float]
    obs_age_at_publish_ms: dict[str, float]
    last: dict[str, float] = field(default_factory=dict)  # last values of the three timings

    @property
    def clipping_frequent(self) -> bool:
        return self.clipped_recent_fraction > FREQUENT_CLIPPING


class ExecutionStats:
    """Counters of one commander; written by the inference and control threads, read by diagnostics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = IDLE
        self.reason: str | None = None
        self.commands = self.holds = self.chunks = 0
        self.skipped_late_total = 0
        self.skipped_late_last: int | None = None
        self.no_action_left = self.starved_ticks = self.too_old_ticks = 0
        self.clipped = ClipCounts()
        self.recent_clipped: deque[bool] = deque(maxlen=WINDOW)
        self.ages_at_start: deque[float] = deque(maxlen=WINDOW)
        self.latencies: deque[float] = deque(maxlen=WINDOW)
        self.ages_at_publish: deque[float] = deque(maxlen=WINDOW)

    def chunk_timing(self, timing: ChunkTiming, t_obs_ns: int, now_ns: int) -> None:
        with self.lock:
            self.chunks += 1
            self.ages_at_start.append((timing.started_ns - t_obs_ns) / 1e6)
            self.latencies.append(timing.latency_s * 1e3)
            self.ages_at_publish.append((now_ns - t_obs_ns) / 1e6)

    def clip(self, counts: ClipCounts) -> None:
        with self.lock:
            self.clipped.add(counts)
            self.recent_clipped.extend([True] * counts.clipped_commands
                                       + [False] * (counts.commands - counts.clipped_commands))

    def clip_braking(self, counts: ClipCounts) -> None:
        """A stop's clips at the position range: counted, but its rows (most of which never run: the next chunk
        replaces a trajectory's tail) stay out of the commands and the recent fraction the WARN reads."""
        with self.lock:
            self.clipped.position += counts.position


def _stats(values: deque[float]) -> dict[str, float]:
    return summarize(values)


class Commander:
    """What both modes share: limits, the last command, the counters, the state."""

    mode = ""

    def __init__(self, joints: tuple[str, ...], dt_ns: int, *, max_input_age_ns: int, on_stale: str,
                 limits: JointLimits, interface: str) -> None:
        self.joints = joints
        self.dt_ns = dt_ns
        self.dt_s = dt_ns / NS_PER_S
        self.max_input_age_ns = max_input_age_ns
        self.on_stale = on_stale
        self.limits = limits
        self.interface = interface
        self.stats = ExecutionStats()
        self._lock = threading.Lock()  # one decision at a time: a chunk and a tick never interleave
        self.reset()

    def reset(self) -> None:
        """Forget every earlier command (on activation, after the clock went back): the first command then starts
        from the measured or observed position, at rest (the robot was held, or has not been commanded), so the
        acceleration limit applies to it too; an earlier session's last command is no longer where the robot is."""
        self.forget_commands()
        self._latest_now_ns: int | None = None

    def reactivate(self, now_ns: int) -> None:
        """On activation: the robot may have moved while inactive, so forget every earlier command (reset)."""
        self.reset()

    def forget_commands(self) -> None:
        """Forget what was commanded (while commanding is off: something else may move the robot meanwhile, so
        the next command starts from the measured or observed position, at rest)."""
        self.last_positions = np.full(len(self.joints), np.nan)  # last commanded
        self.last_velocities = np.zeros(len(self.joints))

    def _check_clock(self, now_ns: int) -> None:
        """A ROS clock that went back (a simulation reset, a looped bag) voids every command planned in the old
        times: what was commanded 'now' is another moment's, queued targets would come due again. Call with
        self._lock held."""
        if self._latest_now_ns is not None and now_ns < self._latest_now_ns - CLOCK_BACK_TOLERANCE_NS:
            self.reset()
        self._latest_now_ns = now_ns if self._latest_now_ns is None else max(self._latest_now_ns, now_ns)

    @property
    def blend_name(self) -> str:
        return "n/a"

    def set_idle(self) -> None:
        """Not commanding (deactivated): /diagnostics says so instead of the last state."""
        self._set_state(IDLE)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        with self.stats.lock:
            self.stats.state, self.stats.reason = state, reason

    def _count(self, hold: bool) -> None:
        with self.stats.lock:
            self.stats.commands += 1
            if hold:
                self.stats.holds += 1

    def _hold_position(self, measured: np.ndarray | None) -> np.ndarray:
        """Where a hold holds: the last commanded position, else the measured one (NaN: unknown)."""
        position = self.last_positions.copy()
        if measured is not None:
            unknown = ~np.isfinite(position)
            position[unknown] = np.asarray(measured, dtype=np.float64)[unknown]
        return position

    def queue_length(self) -> int:
        return 0

    def status(self) -> ExecutionStatus:
        s = self.stats
        with s.lock:
            last = {}
            for key, values in (("obs_age_at_start_ms", s.ages_at_start), ("latency_ms", s.latencies),
                                ("obs_age_at_publish_ms", s.ages_at_publish)):
                if values:
                    last[key] = values[-1]
            recent = list(s.recent_clipped)
            return ExecutionStatus(
                mode=self.mode, interface=self.interface, on_stale=self.on_stale, blend=self.blend_name,
                state=s.state, reason=s.reason, commands=s.commands, holds=s.holds, chunks=s.chunks,
                skipped_late_total=s.skipped_late_total, skipped_late_last=s.skipped_late_last,
                no_action_left=s.no_action_left, starved_ticks=s.starved_ticks, too_old_ticks=s.too_old_ticks,
                queue_length=self.queue_length(), clipped=ClipCounts(**vars(s.clipped)),
                clipped_recent_fraction=(sum(recent) / len(recent)) if recent else 0.0,
                obs_age_at_start_ms=_stats(s.ages_at_start), latency_ms=_stats(s.latencies),
                obs_age_at_publish_ms=_stats(s.ages_at_publish), last=last,
            )


class ChunkCommander(Commander):
    """execution: chunk (see the module docstring)."""

    mode = CHUNK

    def __init__(self, joints: tuple[str, ...], dt_ns: int, *, max_input_age_ns: int, on_stale: str,
                 limits: JointLimits, command_margin_ns: int) -> None:
        super().__init__(joints, dt_ns, max_input_age_ns=max_input_age_ns, on_stale=on_stale, limits=limits,
                         interface=TRAJECTORY)
        self.command_margin_ns = command_margin_ns

    def forget_commands(self) -> None:
        super().forget_commands()
        # What the controller runs since the last published trajectory, in absolute times: the hand-over point
        # (where it was when that trajectory arrived) and the trajectory's points; it interpolates linearly
        # between them (joint_trajectory_controller with positions only) and keeps the last.
        self._times: np.ndarray | None = None
        self._positions: np.ndarray | None = None
        self._held = False
        self._late: str | None = None  # why the last chunk had no action to run (a WARN until one has)
        self._chunk_end_ns: float | None = None  # when the last chunk's own points end (its braking tail follows)

    def reactivate(self, now_ns: int) -> None:
        """On activation: as reset, unless deactivation's braking hold still runs (JTC is still moving on it): the
        next trajectory then hands over from that motion, not from rest."""
        held = self._held and self._times is not None and self._latest_now_ns is not None
        if held and self._latest_now_ns - CLOCK_BACK_TOLERANCE_NS <= now_ns < self._times[-1]:
            self._late = None
            return
        self.reset()

    def commanded_at(self, t_ns: int) -> np.ndarray | None:
        """The position the controller is commanded at `t_ns` (held at the ends)."""
        if self._times is None or self._positions is None:
            return None
        return np.array([np.interp(t_ns, self._times, self._positions[:, j]) for j in range(len(self.joints))])

    def commanded_velocity_at(self, t_ns: int) -> np.ndarray | None:
        """The commanded velocity at `t_ns`: the slope of the segment the controller runs then (0 where it holds)."""
        if self._times is None or self._positions is None:
            return None
        times = self._times
        if len(times) < 2 or not times[0] <= t_ns < times[-1]:
            return np.zeros(len(self.joints))
        i = int(np.searchsorted(times, t_ns, side="right")) - 1  # times[i] <= t_ns < times[i + 1]
        return (self._positions[i + 1] - self._positions[i]) / ((times[i + 1] - times[i]) / NS_PER_S)

    def on_chunk(self, chunk: PlannedChunk, situation: Situation, timing: ChunkTiming) -> TrajectoryCommand | None:
        now = situation.now_ns
        with self._lock:
            self._check_clock(now)
            self.stats.chunk_timing(timing, chunk.t_obs_ns, now)
            first = chunk.first_index_after(now + self.command_margin_ns)
            last_allowed = chunk.t_obs_ns + self.max_input_age_ns + self.dt_ns
            end = min(chunk.horizon, chunk.first_index_after(last_allowed))  # points due <= the bound
            with self.stats.lock:
                self.stats.skipped_late_total += first
                self.stats.skipped_late_last = first
            if not situation.commanding:
                self._set_state(IDLE)
                self.forget_commands()
                return None
            if situation.stop_reason is not None:
                return None  # on_tick holds (or stops); a chunk never overrides that
            if not np.all(np.isfinite(chunk.positions)):
                self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, "the chunk has non-finite actions")
                return None
            if first >= end:
                with self.stats.lock:
                    self.stats.no_action_left += 1
                # Every action was due before now + command_margin_s or after the stale bound: the observation
                # was too old by the time its chunk came. Hold (or stop) as for stale input, and say why until a
                # chunk runs again.
                age_s = (now - chunk.t_obs_ns) / NS_PER_S
                self._late = (f"no action of the last chunk is due between now + command_margin_s and its "
                              f"observation + max_input_age_s + action_dt: the observation was {age_s:.2f} s old "
                              f"when its chunk came (inference {timing.latency_s:.2f} s); raise max_input_age_s "
                              "or make inference faster")
                self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, self._late)
                if self._held or self.on_stale == STOP:
                    return None
                self._held = True
                return self._hold(situation)
            desired = chunk.positions[first:end]
            # The controller replaces its trajectory now and moves from what it commands now to the first point,
            # due in `lead` (margin to margin + dt): the limits apply to that segment, from that velocity.
            previous, velocity = self.commanded_at(now), self.commanded_velocity_at(now)
            if previous is None or velocity is None:
                observed = chunk.positions[0] - chunk.velocities[0] * self.dt_s  # = the state at t_obs
                previous = np.where(np.isfinite(self.last_positions), self.last_positions, observed)
                velocity = self.last_velocities  # at rest after a reset
            lead_s = max(chunk.due_ns(first) - now, 1) / NS_PER_S
            positions, velocities, counts = clip_positions(desired, previous, velocity, self.limits, self.dt_s,
                                                           first_dt_s=lead_s)
            self.stats.clip(counts)
            times = tuple(int(chunk.due_ns(k) - chunk.t_obs_ns) for k in range(first, end))
            # If no chunk replaces it, the trajectory's end must not stop the arm within one segment: it goes on
            # braking to rest within max_acceleration (nothing is added where no limit makes braking take time)
            chunk_end_ns = chunk.t_obs_ns + times[-1]
            tail, _, tail_counts = braking(positions[-1], velocities[-1], self.limits, self.dt_s)
            braking_points = 0 if len(tail) == 1 and np.array_equal(tail[0], positions[-1]) else len(tail)
            if braking_points:
                self.stats.clip_braking(tail_counts)
                positions = np.concatenate([positions, tail])
                times = times + tuple(times[-1] + self.dt_ns * k for k in range(1, braking_points + 1))
            self._times = np.array([now] + [chunk.t_obs_ns + t for t in times], dtype=np.float64)
            self._positions = np.concatenate([np.where(np.isfinite(previous), previous, positions[0])[None, :],
                                              positions])
            self.last_positions = positions[-1].copy()
            self._chunk_end_ns = chunk_end_ns
            self._held = False
            self._late = None
            self._set_state(COMMANDING)
            self._count(hold=False)
            return TrajectoryCommand(chunk.t_obs_ns, times, positions, hold=False, first_action=first,
                                     braking_points=braking_points)

    def on_tick(self, situation: Situation) -> TrajectoryCommand | None:
        with self._lock:
            self._check_clock(situation.now_ns)
            if not situation.commanding:
                self._set_state(IDLE)
                self.forget_commands()
                return None
            if situation.stop_reason is None:
                if self._late is not None:  # held for a late chunk: its reason stays until a chunk runs
                    self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, self._late)
                    return None
                # Held, never commanded, or the chunk's points have ended (its braking tail runs, then JTC keeps
                # the last point).
                if self._chunk_end_ns is None or self._held or situation.now_ns > self._chunk_end_ns:
                    self._set_state(WAITING)
                return None
            self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, situation.stop_reason)
            if self._held:
                return None
            self._held = True
            if self.on_stale == STOP:
                return None
            return self._hold(situation)

    def hold_now(self, situation: Situation) -> TrajectoryCommand | None:
        """One hold, whatever on_stale says (deactivate)."""
        with self._lock:
            self._held = True
            return self._hold(situation)

    def _hold(self, situation: Situation) -> TrajectoryCommand | None:
        now = situation.now_ns
        position = self.commanded_at(now)
        if position is None:
            return None  # nothing was ever commanded: the controller holds where it is
        # The stop starts where the controller is commanded at now + command_margin_s, at the velocity it runs
        # then, and is stamped with now: JTC samples a stamped trajectory at its own clock, so the transport's
        # delay (up to the margin) shifts nothing, where a stamp 0 ("start on arrival") would start the ramp that
        # much late, from a position the arm has already passed.
        start = now + self.command_margin_ns
        from_position, velocity = self.commanded_at(start), self.commanded_velocity_at(start)
        assert from_position is not None and velocity is not None
        rows, _, counts = braking(from_position, velocity, self.limits, self.dt_s)
        self.stats.clip_braking(counts)
        self._chunk_end_ns = now
        self._count(hold=True)
        if len(rows) == 1 and np.array_equal(rows[0], from_position):
            # at rest, or nothing limits the deceleration: one point where the controller is commanded now,
            # reached one period after arrival
            self._times = np.array([float(now)])
            self._positions = position[None, :]
            self.last_positions = position.copy()
            return TrajectoryCommand(0, (self.dt_ns,), position[None, :], hold=True)
        positions = np.concatenate([from_position[None, :], rows])
        times = tuple(self.command_margin_ns + self.dt_ns * k for k in range(len(positions)))
        self._times = np.array([now] + [now + t for t in times], dtype=np.float64)
        self._positions = np.concatenate([position[None, :], positions])
        self.last_positions = positions[-1].copy()
        return TrajectoryCommand(now, times, positions, hold=True, braking_points=len(rows))


class StreamCommander(Commander):
    """execution: stream (see the module docstring)."""

    mode = STREAM

    def __init__(self, joints: tuple[str, ...], dt_ns: int, *, max_input_age_ns: int, on_stale: str,
                 limits: JointLimits, interface: str, blend: BlendSettings) -> None:
        self.queue = StreamQueue(dt_ns, len(joints))  # before the base class's reset, which clears it
        super().__init__(joints, dt_ns, max_input_age_ns=max_input_age_ns, on_stale=on_stale, limits=limits,
                         interface=interface)
        self.blend = blend

    def reset(self) -> None:
        super().reset()
        self.queue.clear()

    def forget_commands(self) -> None:
        super().forget_commands()
        self._braking_ticks = 0  # hold ticks since the last command: a stop ends within MAX_BRAKING_PERIODS

    @property
    def blend_name(self) -> str:
        return self.blend.strategy

    def set_blend(self, blend: BlendSettings) -> None:
        self.blend = blend

    def queue_length(self) -> int:
        return len(self.queue)

    def on_chunk(self, chunk: PlannedChunk, situation: Situation, timing: ChunkTiming) -> None:
        now = situation.now_ns
        with self._lock:
            self._check_clock(now)
        self.stats.chunk_timing(timing, chunk.t_obs_ns, now)
        if not np.all(np.isfinite(chunk.positions)) or not np.all(np.isfinite(chunk.velocities)):
            self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, "the chunk has non-finite actions")
            return
        report = self.queue.merge(chunk, self.queue.next_target(now), self.blend)
        with self.stats.lock:
            self.stats.skipped_late_total += report.skipped_late
            self.stats.skipped_late_last = report.skipped_late
            if report.merged == 0:  # all of it late, or observed before a chunk already queued
                self.stats.no_action_left += 1

    def on_tick(self, tick_ns: int, situation: Situation) -> PointCommand | None:
        target_ns = tick_ns + self.dt_ns
        with self._lock:
            self._check_clock(situation.now_ns)
            queued = self.queue.pop(target_ns // self.dt_ns)
            if not situation.commanding:
                self._set_state(IDLE)
                self.forget_commands()
                return None
            reason = situation.stop_reason
            if reason is None and queued is None:
                with self.stats.lock:
                    self.stats.starved_ticks += 1
                if not np.isfinite(self.last_positions).any():
                    self._set_state(WAITING)
                    return None
                reason = "no queued command (chunks come slower than they run out)"
            if reason is None and queued is not None:
                age = target_ns - queued.t_obs_ns
                if age > self.max_input_age_ns + self.dt_ns:
                    with self.stats.lock:
                        self.stats.too_old_ticks += 1
                    reason = (f"the queued command is {age / 1e9:.2f} s past its observation, more than "
                              "max_input_age_s + action_dt")
            if reason is not None:
                self._set_state(HOLDING if self.on_stale == HOLD else STOPPED, reason)
                if self.on_stale == STOP:
                    # nothing is sent, so the position controller stays at the last command: the next command
                    # starts from rest there (its acceleration limited from 0, not from the motion before the stop)
                    self.last_velocities = np.zeros(len(self.joints))
                    return None
                return self._hold(tick_ns, target_ns, situation.measured)
            assert queued is not None
            self._set_state(COMMANDING)
            if self.interface == VELOCITY_INTERFACE:
                estimate = situation.measured if situation.measured is not None else self.last_positions
                velocities, positions, counts = clip_velocities(queued.velocities[None, :], estimate,
                                                                self.last_velocities, self.limits, self.dt_s)
            else:
                previous = self._hold_position(situation.measured)
                positions, velocities, counts = clip_positions(queued.positions[None, :], previous,
                                                               self.last_velocities, self.limits, self.dt_s)
            self.stats.clip(counts)
            self.last_positions, self.last_velocities = positions[0].copy(), velocities[0].copy()
            self._braking_ticks = 0
            self._count(hold=False)
            return PointCommand(tick_ns, target_ns, positions[0], velocities[0])

    def hold_now(self, tick_ns: int, situation: Situation) -> PointCommand | None:
        """One hold, whatever on_stale says (deactivate)."""
        with self._lock:
            self.queue.clear()
            return self._hold(tick_ns, tick_ns + self.dt_ns, situation.measured, brake=False)

    def _hold(self, tick_ns: int, target_ns: int, measured: np.ndarray | None,
              brake: bool = True) -> PointCommand | None:
        position = self._hold_position(measured)
        if self.interface != VELOCITY_INTERFACE and not np.all(np.isfinite(position)):
            return None  # nowhere known to hold: publish nothing
        velocity = self.last_velocities if brake else np.zeros(len(self.joints))
        within_s = max(MAX_BRAKING_PERIODS - self._braking_ticks, 1) * self.dt_s
        position, velocity, counts = braking_step(position, velocity, self.limits, self.dt_s, within_s)
        self.stats.clip_braking(counts)
        self._braking_ticks += 1
        self.last_positions, self.last_velocities = position, velocity
        self._count(hold=True)
        return PointCommand(tick_ns, target_ns, position, velocity, hold=True)

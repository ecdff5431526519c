"""Chunk mode and stream mode decisions: stamped, bounded trajectories; one command per tick through the queue;
limits applied; hold or stop when inputs go stale; velocity interfaces; the control loop's period."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pi05_ros.execution.blend import BlendSettings
from pi05_ros.execution.commander import (
    ChunkCommander,
    ChunkTiming,
    Situation,
    StreamCommander,
)
from pi05_ros.execution.limits import MAX_BRAKING_PERIODS, JointLimit, JointLimits
from pi05_ros.execution.loop import ControlLoop
from pi05_ros.execution.plan import PlannedChunk

MS = 1_000_000
DT = 50 * MS
NAMES = ("a", "b")
TIMING = ChunkTiming(0, 0.05)


def planned(t_obs_ns: int, positions, velocities=None, sequence: int = 0) -> PlannedChunk:
    positions = np.asarray(positions, dtype=np.float64)
    velocities = np.zeros_like(positions) if velocities is None else np.asarray(velocities, dtype=np.float64)
    return PlannedChunk(t_obs_ns, DT, positions, velocities, positions.copy(), sequence)


def chunk_commander(**kwargs) -> ChunkCommander:
    options = {"max_input_age_ns": 500 * MS, "on_stale": "hold", "limits": JointLimits.none(NAMES),
               "command_margin_ns": 10 * MS, **kwargs}
    return ChunkCommander(NAMES, DT, **options)


def ramp(horizon: int = 50) -> np.ndarray:
    return np.stack([np.arange(horizon) * 0.01, np.arange(horizon) * -0.02], axis=1)


def test_chunk_trajectory_is_stamped_t_obs_starts_at_the_first_due_action_and_ends_at_the_stale_bound() -> None:
    commander = chunk_commander()
    t_obs = 10_000 * MS
    command = commander.on_chunk(planned(t_obs, ramp()), Situation(t_obs + 300 * MS, True), TIMING)
    assert command is not None and command.stamp_ns == t_obs and not command.hold
    # action 5 is due now (0.3 s), action 6 at now + 50 ms > now + margin: the first point is action 6
    assert command.first_action == 6 and command.times_from_start_ns[0] == 7 * DT
    # the last point is due by t_obs + max_input_age_s + dt = 0.55 s: action 10 (0.55 s), not 11
    assert command.times_from_start_ns[-1] == 11 * DT and len(command.times_from_start_ns) == 5
    assert command.braking_points == 0  # no acceleration limit: the bound's point is the last
    np.testing.assert_array_equal(command.positions, ramp()[6:11])
    status = commander.status()
    assert status.skipped_late_last == 6 and status.obs_age_at_publish_ms["max"] == pytest.approx(300.0)


def test_chunk_with_nothing_left_inside_the_bound_holds_and_says_why_until_a_chunk_runs() -> None:
    commander = chunk_commander()
    assert commander.on_chunk(planned(0, ramp()), Situation(560 * MS, True), TIMING) is None  # nothing to hold yet
    assert commander.status().no_action_left == 1
    commander.on_chunk(planned(1000 * MS, ramp()), Situation(1060 * MS, True), TIMING)  # runs 1.1 .. 1.55 s
    late = commander.on_chunk(planned(1050 * MS, ramp()), Situation(1620 * MS, True), TIMING)
    # the observation is 0.57 s old when its chunk comes: no action due inside the bound, so hold where the last
    # trajectory is now (as for stale input), once
    assert late is not None and late.hold and late.stamp_ns == 0
    np.testing.assert_allclose(late.positions[0], ramp()[10])  # action 10, due 1.55 s: the last trajectory's end
    assert commander.on_chunk(planned(1100 * MS, ramp()), Situation(1700 * MS, True), TIMING) is None
    for now in (1750 * MS, 1800 * MS):  # the ticks keep the reason (a WARN on /diagnostics), not "waiting"
        assert commander.on_tick(Situation(now, True)) is None
        status = commander.status()
        assert status.state == "holding" and "0.60 s old" in status.reason and status.no_action_left == 3
    command = commander.on_chunk(planned(1800 * MS, ramp()), Situation(1850 * MS, True), TIMING)
    assert command is not None and not command.hold and commander.status().state == "commanding"
    assert commander.on_tick(Situation(1900 * MS, True)) is None and commander.status().state == "commanding"


def test_chunk_stale_input_holds_once_at_the_commanded_position_now() -> None:
    commander = chunk_commander()
    commander.on_chunk(planned(0, ramp()), Situation(60 * MS, True), TIMING)  # points at 0.1 .. 0.55 s
    assert commander.on_tick(Situation(100 * MS, True)) is None  # all good: JTC runs the trajectory
    hold = commander.on_tick(Situation(200 * MS, True, "input stale"))
    assert hold is not None and hold.hold and hold.stamp_ns == 0 and hold.times_from_start_ns == (DT,)
    np.testing.assert_allclose(hold.positions[0], ramp()[3])  # action 3 is due at 0.2 s
    assert commander.on_tick(Situation(250 * MS, True, "input stale")) is None  # one hold is enough for JTC
    assert commander.status().state == "holding" and commander.status().reason == "input stale"
    # a chunk that finishes during the hold does not move the robot
    assert commander.on_chunk(planned(100 * MS, ramp()), Situation(260 * MS, True, "input stale"), TIMING) is None


def test_chunk_stop_publishes_nothing_and_demo_or_inactive_never_commands() -> None:
    commander = chunk_commander(on_stale="stop")
    commander.on_chunk(planned(0, ramp()), Situation(60 * MS, True), TIMING)
    assert commander.on_tick(Situation(200 * MS, True, "input stale")) is None
    assert commander.status().state == "stopped"
    idle = chunk_commander()
    assert idle.on_chunk(planned(0, ramp()), Situation(60 * MS, False), TIMING) is None
    assert idle.on_tick(Situation(100 * MS, False, "input stale")) is None and idle.status().commands == 0


def test_chunk_limits_clip_from_the_previous_command() -> None:
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_position=0.08), "b": JointLimit(max_velocity=0.2)})
    commander = chunk_commander(limits=limits)
    command = commander.on_chunk(planned(0, ramp()), Situation(0, True), TIMING)
    assert command is not None and command.first_action == 0
    assert command.positions[:, 0].max() == 0.08
    # joint b wants -0.02 per period (0.4 rad/s) from 0; 0.2 rad/s allows -0.01 per period
    np.testing.assert_allclose(command.positions[:4, 1], [0.0, -0.01, -0.02, -0.03], atol=1e-12)
    status = commander.status()
    assert status.clipped.position > 0 and status.clipped.velocity > 0 and status.clipping_frequent


def stream_commander(**kwargs) -> StreamCommander:
    options = {"max_input_age_ns": 500 * MS, "on_stale": "hold", "limits": JointLimits.none(NAMES),
               "interface": "position", "blend": BlendSettings(), **kwargs}
    return StreamCommander(NAMES, DT, **options)


def test_stream_publishes_the_queued_action_for_the_end_of_each_period() -> None:
    commander = stream_commander()
    actions = ramp(20)
    commander.on_chunk(planned(1_000 * MS, actions), Situation(1_110 * MS, True), TIMING)
    # next tick 1.15 s commands target 1.2 s = action 3 (due 1.0 + 0.2 s)
    assert commander.status().skipped_late_last == 3  # due 1.05, 1.10, 1.15 s: their periods end by 1.15 s
    for tick, k in ((1_150, 3), (1_200, 4), (1_250, 5)):
        command = commander.on_tick(tick * MS, Situation(tick * MS, True))
        assert command is not None and command.target_ns == tick * MS + DT and not command.hold
        np.testing.assert_array_equal(command.positions, actions[k])


def test_stream_holds_last_commanded_position_when_stale_or_starved_and_velocity_interface_sends_zeros() -> None:
    commander = stream_commander()
    commander.on_chunk(planned(0, ramp(4)), Situation(0, True), TIMING)  # targets 1..4; the tick at 0 is past
    last = commander.on_tick(DT, Situation(DT, True))  # target 2
    held = commander.on_tick(2 * DT, Situation(2 * DT, True, "'base_image' is stale"))
    assert held.hold and np.array_equal(held.positions, last.positions) and not held.velocities.any()
    assert commander.status().reason == "'base_image' is stale"
    assert not commander.on_tick(3 * DT, Situation(3 * DT, True)).hold  # target 4, fresh again
    starved = commander.on_tick(4 * DT, Situation(4 * DT, True))  # the chunk ran out
    assert starved.hold and commander.status().starved_ticks == 1
    velocity = stream_commander(interface="velocity")
    velocity.on_chunk(planned(0, ramp(4), np.ones((4, 2))), Situation(0, True), TIMING)
    assert velocity.on_tick(DT, Situation(DT, True, None, np.zeros(2))).velocities.tolist() == [1.0, 1.0]
    assert velocity.on_tick(2 * DT, Situation(2 * DT, True, "stale")).velocities.tolist() == [0.0, 0.0]


def test_stream_refuses_commands_older_than_the_stale_bound() -> None:
    commander = stream_commander(max_input_age_ns=100 * MS)
    commander.on_chunk(planned(0, ramp(20)), Situation(-1, True), TIMING)
    ok = commander.on_tick(50 * MS, Situation(50 * MS, True))  # target 0.1 s: 0.1 s after t_obs, <= 0.15
    assert ok is not None and not ok.hold
    held = commander.on_tick(100 * MS, Situation(100 * MS, True))  # target 0.15: allowed (0.1 + 0.05)
    assert not held.hold
    too_old = commander.on_tick(150 * MS, Situation(150 * MS, True))  # target 0.2 s > 0.15 s
    assert too_old.hold and commander.status().too_old_ticks == 1


def test_stream_stop_publishes_nothing_and_blend_changes_at_run_time() -> None:
    commander = stream_commander(on_stale="stop")
    commander.on_chunk(planned(0, ramp()), Situation(0, True), TIMING)
    assert commander.on_tick(DT, Situation(DT, True, "stale")) is None
    commander.set_blend(BlendSettings("crossfade"))
    assert commander.status().blend == "crossfade"


def test_stream_stop_then_resume_accelerates_from_rest_within_the_limit() -> None:
    """on_stale: stop sends nothing, so the position controller rests at the last command; the first command after
    the stop must be limited from rest (it was limited from the motion before the stop: 1.1 rad/s from rest where
    2 rad/s^2 allows 0.1 rad/s in the first period)."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_acceleration=2.0), "b": JointLimit(max_acceleration=2.0)})
    commander = stream_commander(limits=limits, on_stale="stop", max_input_age_ns=5000 * MS)
    moving = np.stack([0.05 * np.arange(1, 81), np.zeros(80)], axis=1)  # 1 rad/s on joint a
    commander.on_chunk(planned(0, moving), Situation(0, True), TIMING)
    for k in range(1, 20):  # up to 1 rad/s at 0.1 rad/s a tick
        command = commander.on_tick(k * DT, Situation(k * DT, True))
    assert command.velocities[0] == pytest.approx(1.0)
    assert all(commander.on_tick(k * DT, Situation(k * DT, True, "stale")) is None for k in range(20, 60))
    resumed = commander.on_tick(60 * DT, Situation(60 * DT, True))  # fresh again: the queue's action for 61 * DT
    assert resumed is not None and not resumed.hold
    # 2 rad/s^2 x 50 ms: 0.1 rad/s, i.e. 5 mm further than the position the controller rests at
    assert resumed.velocities[0] == pytest.approx(0.1)
    assert resumed.positions[0] == pytest.approx(command.positions[0] + 0.005)


def test_control_loop_ticks_on_the_clock_grid_and_counts_missed_ticks() -> None:
    ticks: list[int] = []
    period = 20 * MS
    loop = ControlLoop(time.monotonic_ns, period, ticks.append)
    loop.start()
    time.sleep(0.5)
    assert loop.stop()
    assert all(t % period == 0 for t in ticks)
    assert np.all(np.diff(ticks) >= period) and len(ticks) >= 10  # 25 expected; a loaded CI machine may lose some
    stats = loop.stats()
    assert stats.ticks == len(ticks) and stats.lateness_ms["p50"] < period / MS


def test_control_loop_waits_for_a_clock_and_survives_a_failing_tick() -> None:
    clock = {"now": 0}
    calls = threading.Event()

    def tick(_: int) -> None:
        calls.set()
        raise RuntimeError("boom")

    loop = ControlLoop(lambda: clock["now"], 10 * MS, tick)
    loop.start()
    time.sleep(0.05)
    assert not calls.is_set()  # sim time before /clock: no ticks
    clock["now"] = 1_000 * MS
    assert calls.wait(1.0)
    clock["now"] = 1_100 * MS  # ten periods later: one tick, nine missed
    time.sleep(0.1)
    assert loop.stop() and loop.stats().missed >= 9


def assert_within_limits(start: np.ndarray, start_velocity: np.ndarray, start_ns: int, times_ns: list[int],
                         positions: np.ndarray, v_max: float, a_max: float) -> None:
    """Joint a's segments from (start, start_velocity) at start_ns through each point at times_ns: speed <= v_max,
    velocity change between segments <= a_max times the segment's duration (1e-9: float rounding)."""
    p, v, t = start[0], start_velocity[0], start_ns
    for when, point in zip(times_ns, positions[:, 0], strict=True):
        span = (when - t) / 1e9
        speed = (point - p) / span
        assert abs(speed) <= v_max + 1e-9, (when, speed)
        assert abs(speed - v) <= a_max * span + 1e-9, (when, speed, v)
        p, v, t = point, speed, when


def test_chunk_hand_over_limits_the_segment_the_controller_runs_from_now() -> None:
    """The controller replaces its trajectory on arrival and runs from what it commands now to the first point,
    due `margin` to `margin + dt` later: the limits hold on that segment and from the velocity it had."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_velocity=1.0, max_acceleration=2.0)})
    commander = chunk_commander(limits=limits)
    moving = np.stack([np.arange(1, 51) * 0.05, np.zeros(50)], axis=1)  # 1 rad/s from 0
    first = commander.on_chunk(planned(0, moving, np.full((50, 2), 1.0)), Situation(30 * MS, True), TIMING)
    assert first is not None
    # the first chunk starts at rest from the observed state (0) and 20 ms before its first point is due
    assert_within_limits(np.zeros(2), np.zeros(2), 30 * MS, list(np.array(first.times_from_start_ns)),
                         first.positions, 1.0, 2.0)
    now = 430 * MS
    start, start_velocity = commander.commanded_at(now), commander.commanded_velocity_at(now)
    back = np.zeros((50, 2))  # the next chunk wants the joint back at 0, far behind
    second = commander.on_chunk(planned(400 * MS, back), Situation(now, True), TIMING)
    assert second is not None and second.times_from_start_ns[0] + 400 * MS - now == 20 * MS
    assert start_velocity[0] > 0.3  # it was moving forward
    assert_within_limits(start, start_velocity, now, [400 * MS + t for t in second.times_from_start_ns],
                         second.positions, 1.0, 2.0)
    assert commander.status().clipped.acceleration > 0


def test_chunk_hold_brakes_from_the_commanded_motion_within_the_acceleration_limit() -> None:
    """Stale input while the arm moves at 1 rad/s with max_acceleration 2 rad/s^2: the hold is a trajectory to rest
    that starts from what the controller runs now and slows at 2 rad/s^2 at most (0.5 s, ten points), not a stop
    within one period (20 rad/s^2). Deactivation's hold brakes the same way; without limits a hold is one point."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_velocity=1.5, max_acceleration=2.0),
                                    "b": JointLimit(max_acceleration=2.0)})
    for stale in (True, False):
        commander = chunk_commander(limits=limits)
        t_obs = 1000 * MS
        for _ in range(20):  # up to speed first: chunks of a steady 1 rad/s (joint b 0.5 rad/s)
            q = t_obs / 1e9
            wanted = np.stack([q + 0.05 * np.arange(1, 51), 0.5 * q + 0.025 * np.arange(1, 51)], axis=1)
            assert commander.on_chunk(planned(t_obs, wanted, np.tile([1.0, 0.5], (50, 1))),
                                      Situation(t_obs + 20 * MS, True), TIMING) is not None
            t_obs += 100 * MS
        now = t_obs - 70 * MS
        start, start_velocity = commander.commanded_at(now), commander.commanded_velocity_at(now)
        assert start_velocity[0] == pytest.approx(1.0, abs=1e-6)
        margin = 10 * MS
        lead = commander.commanded_at(now + margin)
        hold = (commander.on_tick(Situation(now, True, "input stale")) if stale
                else commander.hold_now(Situation(now, True)))
        # stamped now, not 0: JTC samples it on its own clock, so a transport delay up to command_margin_s shifts
        # nothing; its first point continues the running motion to now + margin, then ten braking periods
        assert hold is not None and hold.hold and hold.stamp_ns == now and hold.braking_points == 10
        assert hold.times_from_start_ns == tuple(margin + DT * k for k in range(11))
        np.testing.assert_allclose(hold.positions[0], lead)
        assert_within_limits(start, start_velocity, now, [now + t for t in hold.times_from_start_ns],
                             hold.positions, 1.5, 2.0)
        speeds = np.diff(hold.positions, axis=0) / (DT / 1e9)
        assert speeds[-1].tolist() == [0.0, 0.0] and speeds[0, 0] > 0.85  # at rest on the last point, not sooner
        np.testing.assert_allclose(speeds[:, 1], 0.5 * speeds[:, 0], atol=1e-9)  # b keeps the direction
        assert commander.commanded_velocity_at(now + margin + 2 * DT + 1)[0] == pytest.approx(speeds[2, 0])
    unlimited = chunk_commander()
    unlimited.on_chunk(planned(0, ramp()), Situation(60 * MS, True), TIMING)
    assert unlimited.on_tick(Situation(200 * MS, True, "input stale")).times_from_start_ns == (DT,)


def test_chunk_braking_tail_is_not_commanding_and_reactivation_during_a_braking_hold_hands_over_from_it() -> None:
    """The tail after a chunk's last point is no policy action: /diagnostics says "waiting" once the chunk's own
    points have run. Deactivated mid-motion (a braking hold) and activated again before it has stopped, the next
    chunk starts from the braking motion within the limits, not from rest; activated after it, from rest."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_acceleration=2.0), "b": JointLimit(max_acceleration=2.0)})
    moving = np.stack([0.05 * np.arange(1, 51), np.zeros(50)], axis=1)
    run = np.tile([1.0, 0.0], (50, 1))
    commander = chunk_commander(limits=limits)
    command = commander.on_chunk(planned(0, moving, run), Situation(20 * MS, True), TIMING)
    assert command.braking_points > 0
    chunk_end = command.times_from_start_ns[-1 - command.braking_points]  # 0.55 s: the stale bound
    assert commander.on_tick(Situation(chunk_end - 10 * MS, True)) is None
    assert commander.status().state == "commanding"
    assert commander.on_tick(Situation(chunk_end + 10 * MS, True)) is None  # the tail runs: not a policy action
    assert commander.status().state == "waiting for a chunk"

    for pause_ms, from_rest in ((100, False), (5000, True)):
        commander = chunk_commander(limits=limits)
        t_obs = 0
        for _ in range(40):  # up to speed: chunks of a steady 1 rad/s (settled after ~2 s)
            q = t_obs / 1e9
            wanted = np.stack([q + 0.05 * np.arange(1, 51), np.zeros(50)], axis=1)
            commander.on_chunk(planned(t_obs, wanted, run), Situation(t_obs + 20 * MS, True), TIMING)
            commander.on_tick(Situation(t_obs + 50 * MS, True))
            t_obs += 100 * MS
        stopped = t_obs
        hold = commander.hold_now(Situation(stopped, True))  # deactivate
        assert hold.braking_points > 5
        commander.set_idle()
        now = stopped + pause_ms * MS
        commander.reactivate(now)
        start, velocity = commander.commanded_at(now), commander.commanded_velocity_at(now)
        if from_rest:
            assert start is None
            continue
        assert velocity[0] > 0.5  # still braking from 1 rad/s
        q = now / 1e9
        wanted = np.stack([q + 0.05 * np.arange(1, 51), np.zeros(50)], axis=1)
        command = commander.on_chunk(planned(now - 20 * MS, wanted, run), Situation(now, True), TIMING)
        assert_within_limits(start, velocity, now, [now - 20 * MS + t for t in command.times_from_start_ns],
                             command.positions, np.inf, 2.0)


def test_braking_clips_at_the_range_are_counted_but_not_as_commands() -> None:
    """A tail or hold that would brake past max_position stops at it: counted in clipped.position, while its rows
    (a tail never runs when the next chunk comes) stay out of the recent fraction behind the clipping WARN."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_position=0.4, max_acceleration=2.0),
                                    "b": JointLimit(max_acceleration=2.0)})
    commander = chunk_commander(limits=limits)
    # from rest at 2 rad/s^2 the chunk's points reach 0.33 at 1.1 rad/s, which needs 0.3 rad more to stop
    wanted = np.stack([0.05 * np.arange(1, 12), np.zeros(11)], axis=1)
    command = commander.on_chunk(planned(0, wanted, np.tile([1.0, 0.0], (11, 1))), Situation(0, True), TIMING)
    assert command.braking_points > 0 and command.positions[:, 0].max() == 0.4
    status = commander.status()
    # the tail's clip is counted; its rows are not commands (the chunk's 11 are: its run-up from rest is
    # acceleration-clipped, which is what the recent fraction then shows)
    assert status.clipped.position >= 1 and status.clipped.commands == len(command.positions) - command.braking_points
    before = status.clipped.position
    late = command.times_from_start_ns[-1 - command.braking_points] - 2 * DT  # fast, close to the bound
    assert commander.commanded_at(late)[0] + commander.commanded_velocity_at(late)[0] ** 2 / 4 > 0.4
    hold = commander.on_tick(Situation(late, True, "input stale"))
    assert hold.positions[:, 0].max() == 0.4 and commander.status().clipped.position > before


def test_stream_braking_ends_within_max_braking_periods() -> None:
    """A speed far beyond the acceleration limit's reach (100 rad/s at 1 rad/s^2: 100 s, 2000 periods) still ends at
    rest within MAX_BRAKING_PERIODS ticks of holding, ramping down harder."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_acceleration=1.0), "b": JointLimit()})
    commander = stream_commander(limits=limits)
    commander.last_positions, commander.last_velocities = np.zeros(2), np.array([100.0, 0.0])  # as after a run
    speeds = []
    for k in range(MAX_BRAKING_PERIODS + 5):
        hold = commander.on_tick(k * DT, Situation(k * DT, True, "stale", np.zeros(2)))
        speeds.append(hold.velocities[0])
    assert speeds[MAX_BRAKING_PERIODS - 1] == 0.0 and speeds[MAX_BRAKING_PERIODS - 2] > 0
    assert np.all(np.diff(speeds) <= 0)


def test_stream_hold_brakes_each_tick_and_deactivation_stops_at_once() -> None:
    """Stale input in stream mode with max_acceleration 2 rad/s^2 and 1 rad/s: each hold tick takes 0.1 rad/s off
    (position interface: the positions come closer together until they repeat; velocity interface: the velocity
    commands ramp down to 0). Deactivation's hold is zero velocity at once: nothing follows it."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_velocity=1.0, max_acceleration=2.0),
                                    "b": JointLimit(max_acceleration=2.0)})
    moving = np.stack([0.05 * np.arange(1, 31), np.zeros(30)], axis=1)
    run = np.tile([1.0, 0.0], (30, 1))
    for interface in ("position", "velocity"):
        commander = stream_commander(limits=limits, interface=interface, max_input_age_ns=2000 * MS)
        commander.on_chunk(planned(0, moving, run), Situation(0, True), TIMING)
        measured = np.zeros(2)
        for k in range(1, 20):  # up to 1 rad/s at 2 rad/s^2 (0.1 rad/s a tick), then steady
            command = commander.on_tick(k * DT, Situation(k * DT, True, None, measured))
            measured = command.positions
        assert command.velocities[0] == pytest.approx(1.0)
        holds = [commander.on_tick(k * DT, Situation(k * DT, True, "stale", measured)) for k in range(20, 32)]
        assert all(h.hold for h in holds)
        speeds = [h.velocities[0] for h in holds]
        np.testing.assert_allclose(speeds[:10], 1.0 - 0.1 * np.arange(1, 11), atol=1e-9)
        assert speeds[10:] == [0.0, 0.0]
        if interface == "position":
            steps = np.diff([command.positions[0]] + [h.positions[0] for h in holds]) / (DT / 1e9)
            np.testing.assert_allclose(steps, speeds, atol=1e-9)  # the positions follow the ramp
        again = stream_commander(limits=limits, interface=interface, max_input_age_ns=2000 * MS)
        again.on_chunk(planned(0, moving, run), Situation(0, True), TIMING)
        seen = np.zeros(2)
        for k in range(1, 20):
            last = again.on_tick(k * DT, Situation(k * DT, True, None, seen))
            seen = last.positions
        assert last.velocities[0] == pytest.approx(1.0)
        stop = again.hold_now(20 * DT, Situation(20 * DT, True, None, last.positions))
        assert stop.hold and not stop.velocities.any() and np.array_equal(stop.positions, last.positions)


def test_reset_forgets_the_last_command_so_reactivation_starts_where_the_robot_is() -> None:
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_velocity=1.0, max_acceleration=2.0)})
    stream = stream_commander(limits=limits)
    stream.on_chunk(planned(0, np.full((4, 2), 0.8)), Situation(0, True), TIMING)
    stream.on_tick(DT, Situation(DT, True, None, np.full(2, 0.8)))
    assert stream.hold_now(2 * DT, Situation(2 * DT, True)).positions[0] == 0.8
    stream.reset()  # deactivated, the robot moved by hand to -0.5, activated again
    measured = np.full(2, -0.5)
    assert stream.on_tick(10 * DT, Situation(10 * DT, True, None, measured)) is None  # no hold back to 0.8
    stream.on_chunk(planned(10 * DT, np.full((8, 2), 0.5)), Situation(10 * DT, True, None, measured), TIMING)
    command = stream.on_tick(11 * DT, Situation(11 * DT, True, None, measured))
    # from the measured -0.5 at rest: a_max * dt = 0.1 rad/s, so 0.005 rad in the first period
    assert command.positions[0] == pytest.approx(-0.495) and command.velocities[0] == pytest.approx(0.1)

    chunk = chunk_commander(limits=limits)
    chunk.on_chunk(planned(0, np.full((50, 2), 0.8)), Situation(0, True), TIMING)
    chunk.hold_now(Situation(100 * MS, True))
    chunk.reset()
    assert chunk.commanded_at(200 * MS) is None and chunk.hold_now(Situation(200 * MS, True)) is None
    # the next chunk starts from its own observed state (-0.5), at rest
    wanted = np.full((50, 2), 0.5)
    velocities = np.zeros((50, 2))
    velocities[0] = (0.5 - -0.5) / (DT / 1e9)
    command = chunk.on_chunk(planned(1000 * MS, wanted, velocities), Situation(1000 * MS, True), TIMING)
    assert_within_limits(np.full(2, -0.5), np.zeros(2), 1000 * MS,
                         [1000 * MS + t for t in command.times_from_start_ns], command.positions, 1.0, 2.0)


def test_chunk_velocity_at_hand_over_is_the_segment_the_controller_runs_at_any_rate() -> None:
    """A steady 1 rad/s motion, chunks at 10 and 30 Hz, 20 ms after their observation: the commanded velocity
    at each hand-over is the one the controller runs (the segment from the previous hand-over), so an
    acceleration limit leaves the motion alone instead of braking it at every chunk above the action rate."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_acceleration=5.0)})
    for period_ms in (100, 33):
        commander = chunk_commander(limits=limits)
        t_obs = 1000 * MS
        for i in range(30):
            now = t_obs + 20 * MS
            velocity = commander.commanded_velocity_at(now)
            start = commander.commanded_at(now)
            q = t_obs / 1e9  # where the robot is at t_obs, moving at 1 rad/s
            wanted = np.stack([q + 0.05 * np.arange(1, 51), np.zeros(50)], axis=1)
            velocities = np.stack([np.ones(50), np.zeros(50)], axis=1)
            command = commander.on_chunk(planned(t_obs, wanted, velocities), Situation(now, True), TIMING)
            assert command is not None
            if i >= 10:  # once up to speed (the first chunk starts at rest)
                assert velocity[0] == pytest.approx(1.0, abs=1e-6), (period_ms, i)
                times = [t_obs + t for t in command.times_from_start_ns]
                assert_within_limits(start, velocity, now, times, command.positions, np.inf, 5.0)
                speeds = np.diff(command.positions[:, 0]) / (DT / 1e9)
                steady = len(command.positions) - command.braking_points
                np.testing.assert_allclose(speeds[:steady - 1], 1.0, atol=1e-6)
                # then the trajectory brakes to rest at 5 rad/s^2 (0.25 rad/s a period) in case no chunk follows
                np.testing.assert_allclose(speeds[steady - 1:], [0.75, 0.5, 0.25, 0.0], atol=1e-6)
            t_obs += period_ms * MS


def test_commanding_off_forgets_what_was_commanded_so_it_resumes_where_the_robot_is() -> None:
    """publish_joint_trajectory off (or any pause without deactivation) while something else moves the robot: the
    next command starts from the observed / measured position, not from the last command of long ago."""
    limits = JointLimits.of(NAMES, {"a": JointLimit(max_velocity=1.0)})
    chunk = chunk_commander(limits=limits)
    chunk.on_chunk(planned(0, np.full((50, 2), 0.1)), Situation(20 * MS, True), TIMING)
    for k in range(1, 4):  # commanding off; the arm is moved to 1.5
        chunk.on_tick(Situation(k * 1000 * MS, False, None, np.full(2, 1.5)))
    assert chunk.commanded_at(4000 * MS) is None and chunk.hold_now(Situation(4000 * MS, True)) is None
    back = chunk.on_chunk(planned(5000 * MS, np.full((50, 2), 1.5)), Situation(5020 * MS, True), TIMING)
    np.testing.assert_allclose(back.positions[:, 0], 1.5)  # the policy holds 1.5 and so does the command

    stream = stream_commander(limits=limits)
    stream.on_chunk(planned(0, np.full((8, 2), 0.1)), Situation(0, True), TIMING)
    stream.on_tick(DT, Situation(DT, True, None, np.full(2, 0.1)))
    stream.on_tick(2 * DT, Situation(2 * DT, False, None, np.full(2, 1.5)))  # off; the arm is moved
    stream.on_chunk(planned(10 * DT, np.full((8, 2), 1.5)), Situation(10 * DT, True), TIMING)
    command = stream.on_tick(11 * DT, Situation(11 * DT, True, None, np.full(2, 1.5)))
    assert command.positions[0] == pytest.approx(1.5)


def test_a_clock_that_goes_back_voids_earlier_commands_and_queued_targets() -> None:
    """A simulation reset or a looped bag: nothing planned in the old times is held toward or replayed."""
    chunk = chunk_commander()
    chunk.on_chunk(planned(100_000 * MS, np.full((50, 2), 1.0)), Situation(100_020 * MS, True), TIMING)
    command = chunk.on_chunk(planned(1000 * MS, np.zeros((50, 2))), Situation(1020 * MS, True), TIMING)
    np.testing.assert_allclose(command.positions, 0.0)  # not from the old trajectory's 1.0
    assert chunk.hold_now(Situation(1100 * MS, True)).positions[0, 0] == pytest.approx(0.0)

    stream = stream_commander()
    stream.on_chunk(planned(100_000 * MS, np.full((50, 2), 1.0)), Situation(100_020 * MS, True), TIMING)
    assert stream.on_tick(100_050 * MS, Situation(100_050 * MS, True)).positions[0] == 1.0
    for i in range(3):  # back to 1 s: new chunks are taken, and every tick commands the new targets
        t_obs = 1000 * MS + i * 100 * MS
        stream.on_chunk(planned(t_obs, np.full((50, 2), 0.5)), Situation(t_obs + 20 * MS, True), TIMING)
        tick = t_obs + 50 * MS
        command = stream.on_tick(tick, Situation(tick, True, None, np.full(2, 0.5)))
        assert command is not None and not command.hold and command.positions[0] == 0.5
    assert stream.status().no_action_left == 0
    assert max(c.index for c in stream.queue.pending(0)) < 100_000 * MS // DT  # nothing of the old times left


def test_control_loop_keeps_its_period_on_a_faster_sim_clock() -> None:
    start = time.monotonic_ns()
    ticks: list[int] = []
    period = 50 * MS
    loop = ControlLoop(lambda: 10**9 + 5 * (time.monotonic_ns() - start), period, ticks.append)  # 5x real time
    loop.start()
    time.sleep(1.0)
    assert loop.stop()
    # 5 s of sim time: 100 periods (at least 60 on a loaded CI machine; a wall-time wait gave ~38)
    assert len(ticks) >= 60 and loop.stats().missed <= len(ticks) // 2, (len(ticks), loop.stats())

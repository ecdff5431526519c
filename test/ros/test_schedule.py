"""The inference thread's rate grid (ros/schedule.py): pure arithmetic over given times, no threads, no sleeps."""

from __future__ import annotations

import pytest

from pi05_ros.ros.schedule import RateScheduler


def test_starts_follow_a_fixed_grid() -> None:
    grid = RateScheduler()
    assert grid.wait_s(100.0) == 0.0  # the first start is at once
    assert grid.start(100.0, 0.1) == 0
    assert grid.wait_s(100.03) == pytest.approx(0.07)
    # A start a little late (jitter) keeps the grid: the next is planned from the plan, not from the late start.
    assert grid.start(100.12, 0.1) == 0
    assert grid.next_start == pytest.approx(100.2)


def test_a_late_tick_restarts_the_grid_without_a_burst() -> None:
    grid = RateScheduler()
    grid.start(0.0, 0.1)  # next planned at 0.1
    # An inference took 0.35 s: 2 whole periods past the plan are lost, and the grid starts again now.
    assert grid.start(0.45, 0.1) == 3
    assert grid.next_start == pytest.approx(0.55)
    assert grid.wait_s(0.46) == pytest.approx(0.09)  # one period later, not at once for each missed tick


def test_a_rate_change_during_the_wait_replans_from_the_last_start() -> None:
    grid = RateScheduler()
    grid.start(10.0, 0.5)  # 2 Hz: next at 10.5
    assert grid.woken_early(10.2)  # woken 0.3 s before the plan (rate_hz changed)
    grid.replan(0.5, 0.1)  # now 10 Hz: the next start is the last start (10.0) + 0.1
    assert grid.next_start == pytest.approx(10.1)
    assert grid.wait_s(10.2) == 0.0 and not grid.woken_early(10.2)
    assert grid.start(10.2, 0.1) == 0  # 0.1 s past the new plan is within a period: no tick counted as missed


def test_waking_on_time_is_not_early() -> None:
    grid = RateScheduler()
    grid.start(0.0, 0.1)
    assert not grid.woken_early(0.1 - 5e-5)  # within the wake-up granularity
    assert grid.woken_early(0.05)

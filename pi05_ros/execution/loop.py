"""The control loop: a thread that calls `tick(t)` at every multiple t of the period on the ROS clock.

It keeps its period while inference runs in another thread (it only waits, samples the clock and calls the
tick). Paced on the ROS clock, so with use_sim_time it follows /clock: no ticks while the clock stands still
or before its first message (now = 0), and at a faster sim clock it runs faster. A tick more than a period late
runs once, counting the ticks it missed, instead of catching up in a burst. Its lateness (how long after the
planned time a tick started) is the loop's jitter, on /diagnostics and in docs/benchmarks.md. No ROS imports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

JITTER_WINDOW = 1000  # ticks
MAX_CLOCK_RATE = 100.0  # the fastest sim clock (real-time factor) the loop keeps up with


def summarize(samples: Iterable[float]) -> dict[str, float]:
    """mean, p50, p99, max and count of `samples` ({} when there are none); engine/timing.py's summarize
    without its torch import."""
    a = np.asarray(list(samples), dtype=np.float64)
    if a.size == 0:
        return {}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "count": int(a.size)}


@dataclass(frozen=True)
class LoopStats:
    ticks: int
    missed: int
    lateness_ms: dict[str, float]  # summarize() of the last JITTER_WINDOW ticks' lateness


class ControlLoop:
    def __init__(self, clock_ns: Callable[[], int], period_ns: int, tick: Callable[[int], None],
                 name: str = "pi05_control") -> None:
        self._clock_ns = clock_ns
        self.period_ns = period_ns
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._ticks = 0
        self._missed = 0
        self._lateness: deque[float] = deque(maxlen=JITTER_WINDOW)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> bool:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> LoopStats:
        with self._lock:
            lateness = summarize(self._lateness)
            return LoopStats(self._ticks, self._missed, lateness)

    def _run(self) -> None:
        period = self.period_ns
        next_tick: int | None = None
        rate = 1.0  # ROS-clock seconds per wall second (a sim clock may run faster)
        last: tuple[int, int] | None = None  # (ROS clock, monotonic) when the clock was last read
        while not self._stop.is_set():
            now, wall = self._clock_ns(), time.monotonic_ns()
            if last is not None and wall > last[1] and now >= last[0]:
                # the clock's pace over the last wait, smoothed; waits shrink with it, never grow past the
                # clock's own interval (a slow clock is only polled more often)
                rate = 0.5 * rate + 0.5 * min(max((now - last[0]) / (wall - last[1]), 1.0), MAX_CLOCK_RATE)
            last = (now, wall)
            if now <= 0:  # sim time before the first /clock message
                self._stop.wait(period / 1e9)
                continue
            if next_tick is None or next_tick - now > 2 * period:  # first tick, or the clock went back
                next_tick = -(-now // period) * period
            if now < next_tick:
                self._stop.wait(min(next_tick - now, period) / rate / 1e9)
                continue
            late = now - next_tick
            missed = late // period
            if missed:
                next_tick += missed * period
                late -= missed * period
            with self._lock:
                self._ticks += 1
                self._missed += missed
                self._lateness.append(late / 1e6)
            try:
                self._tick(next_tick)
            except Exception:  # noqa: BLE001 - the loop must keep running; the error is logged
                log.exception("control tick failed")
            next_tick += period

"""When the inference thread starts its next inference at a target rate: a fixed grid of start times, kept
through late ticks without bursting, and re-planned when rate_hz changes while the thread waits. Pure
arithmetic over monotonic seconds, no clock of its own, so it is tested without threads or sleeps."""

from __future__ import annotations

# A wake-up this close to the planned start counts as on time (timer and Event.wait granularity).
EARLY_WAKE_S = 1e-4


class RateScheduler:
    """Start times on a grid of `period` seconds. Call `wait_s(now)` to learn how long to wait, `start(now,
    period)` when an inference starts, and `replan(old, new)` when the period changed during a wait."""

    def __init__(self) -> None:
        self.next_start: float | None = None  # None before the first start

    def wait_s(self, now: float) -> float:
        """Seconds until the planned start (0 when it is due, or nothing is planned yet)."""
        return 0.0 if self.next_start is None else max(0.0, self.next_start - now)

    def woken_early(self, now: float) -> bool:
        """After a wait: whether it ended before the planned start (a stop, or a rate change, woke it)."""
        return self.next_start is not None and now < self.next_start - EARLY_WAKE_S

    def replan(self, old_period: float, new_period: float) -> None:
        """The period changed while waiting: the next start is the last start + the new period."""
        if self.next_start is not None:
            self.next_start -= old_period - new_period

    def start(self, now: float, period: float) -> int:
        """An inference starts at `now`; plans the next one period later. Returns the grid ticks missed: more
        than a whole period late restarts the grid at `now` instead of running the missed ticks in a burst."""
        missed = 0
        if self.next_start is None or now - self.next_start > period:
            if self.next_start is not None:
                missed = int((now - self.next_start) // period)
            self.next_start = now
        self.next_start += period
        return missed

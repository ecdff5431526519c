"""The stop flag of the package's executables: SIGINT / SIGTERM set it, the main thread waits on it and then shuts
down in its own order. No ROS here: the node and `pi05-serve --ray` both use it."""

from __future__ import annotations

import signal
import time


class StopEvent:
    """Set by SIGINT/SIGTERM; remembers when, so an executable can report how long its shutdown took.

    Not a threading.Event on purpose: Python runs a signal handler in the main thread between two bytecodes,
    which can be inside Event.wait() while that thread holds the event's own lock, and Event.set() in the handler
    would then wait for that lock forever (the process never stops). Here the handler only assigns an attribute
    and wait() polls, so no lock is ever taken on either side."""

    POLL_S = 0.01  # how soon a wait notices the signal

    def __init__(self) -> None:
        self.signalled_at: float | None = None

    def on_signal(self, *_: object) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()

    def is_set(self) -> bool:
        return self.signalled_at is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Return True as soon as the flag is set, False after `timeout` seconds without it (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0.0:
                return False
            time.sleep(min(left, self.POLL_S))
        return True

    def seconds_since_signal(self) -> float | None:
        return None if self.signalled_at is None else time.monotonic() - self.signalled_at


def stop_on_signals() -> StopEvent:
    """A StopEvent that SIGINT and SIGTERM set (handlers installed now, from the main thread)."""
    stop = StopEvent()
    signal.signal(signal.SIGINT, stop.on_signal)
    signal.signal(signal.SIGTERM, stop.on_signal)
    return stop

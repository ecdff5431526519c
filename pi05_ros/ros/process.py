"""Start-up shared by the package's executables: signals that only set a flag, then rclpy without its own
signal handlers, so each executable shuts down in its own order (and within a second)."""

from __future__ import annotations

import signal
import sys
import threading
import time

import rclpy
from rclpy.signals import SignalHandlerOptions


class StopEvent(threading.Event):
    """Set by SIGINT/SIGTERM; remembers when, so an executable can report how long its shutdown took."""

    signalled_at: float | None = None

    def on_signal(self, *_: object) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        self.set()

    def seconds_since_signal(self) -> float | None:
        return None if self.signalled_at is None else time.monotonic() - self.signalled_at


def init_ros(argv: list[str] | None) -> StopEvent:
    """Install SIGINT/SIGTERM handlers and initialise rclpy; the returned event is set on either signal."""
    stop = StopEvent()
    signal.signal(signal.SIGINT, stop.on_signal)
    signal.signal(signal.SIGTERM, stop.on_signal)
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    return stop

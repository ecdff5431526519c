"""Start-up shared by the package's executables: signals that only set a flag, then rclpy without its own
signal handlers, so each executable shuts down in its own order (and within a second)."""

from __future__ import annotations

import signal
import sys
import threading

import rclpy
from rclpy.signals import SignalHandlerOptions


def init_ros(argv: list[str] | None) -> threading.Event:
    """Install SIGINT/SIGTERM handlers and initialise rclpy; the returned event is set on either signal."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    return stop

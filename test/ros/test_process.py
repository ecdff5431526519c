"""The start-up the executables share: the Fast DDS profile (applied unless the user chose a profile or another
RMW), and the stop flag their signal handlers set."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import FrameType
from typing import Any

from ros_harness import package_prefix

from pi05_ros.ros.process import DDS_PROFILE_FILE, use_dds_profile
from pi05_ros.signals import StopEvent

NS = "{http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles}"


def test_the_installed_profile_is_applied_when_nothing_else_is_chosen(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    profile = use_dds_profile(environ)
    assert profile == package_prefix() / "share" / "pi05_ros" / "config" / DDS_PROFILE_FILE
    assert environ == {"FASTRTPS_DEFAULT_PROFILES_FILE": str(profile), "RMW_FASTRTPS_USE_QOS_FROM_XML": "1"}
    # readers free each sample's buffer; the rest as rmw_fastrtps sets it by default
    root = ET.parse(profile).getroot()
    reader = root.find(f"{NS}data_reader")
    writer = root.find(f"{NS}data_writer")
    assert reader.get("is_default_profile") == "true" and reader.find(f"{NS}historyMemoryPolicy").text == "DYNAMIC"
    assert writer.find(f"{NS}qos/{NS}publishMode/{NS}kind").text == "SYNCHRONOUS"
    source = Path(__file__).resolve().parents[2] / "config" / DDS_PROFILE_FILE
    assert source.read_text() == profile.read_text()


def test_a_users_choice_is_left_alone(tmp_path: Path) -> None:
    for environ in ({"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"}, {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"},
                    {"RMW_FASTRTPS_USE_QOS_FROM_XML": "0"}, {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}):
        before = dict(environ)
        assert use_dds_profile(environ) is None and environ == before
    assert use_dds_profile({}, profile=tmp_path / "missing.xml") is None


def wait_with_handler_at(stop: StopEvent, fire_at: int | None, timeout: float) -> tuple[bool | None, int]:
    """stop.wait(timeout) in a thread whose tracer calls stop.on_signal() at its `fire_at`-th Python line event,
    as a signal handler would run there (Python runs handlers between bytecodes of the main thread, inside
    whatever that thread is doing). Returns (what wait returned, None if it had not returned 5 s later; the number
    of line events the wait ran)."""
    lines = 0
    result: list[bool] = []

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            if lines == fire_at:
                stop.on_signal()  # the tracer itself is not traced
            lines += 1
        return trace

    def run() -> None:
        sys.settrace(trace)
        try:
            result.append(stop.wait(timeout))
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=run, daemon=True)  # a deadlocked one must not hold the test process
    thread.start()
    thread.join(5.0)
    return (result[0] if result else None), lines


def test_the_signal_handler_can_run_anywhere_inside_a_wait() -> None:
    # threading.Event failed this at its first line holding the event's lock: set() waited for it forever
    _, lines = wait_with_handler_at(StopEvent(), None, 0.03)
    assert lines > 3  # the wait ran Python lines for the handler to land on
    for fire_at in range(lines):
        returned, _ = wait_with_handler_at(stop := StopEvent(), fire_at, 0.03)
        assert returned is not None, f"the wait hung with the handler at its line event {fire_at}"
        assert stop.is_set() and stop.seconds_since_signal() is not None
    returned, _ = wait_with_handler_at(stop := StopEvent(), None, 0.03)
    assert returned is False and not stop.is_set() and stop.seconds_since_signal() is None


def test_a_real_signal_ends_the_main_threads_wait_promptly() -> None:
    assert threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    stop = StopEvent()
    previous = signal.signal(signal.SIGUSR1, stop.on_signal)
    try:
        sender = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
        start = time.monotonic()
        sender.start()
        assert stop.wait(10.0)
        waited = time.monotonic() - start
        sender.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # the signal comes 0.1 s in; the wait polls every POLL_S (0.01 s): 0.5 s leaves room for a loaded CI machine
    assert 0.1 <= waited < 0.5 and stop.seconds_since_signal() < waited
    assert stop.wait(0.0)  # stays set; a second signal keeps the first one's time
    first = stop.signalled_at
    stop.on_signal()
    assert stop.signalled_at == first

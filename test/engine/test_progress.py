"""Progress off a terminal: whole lines (no carriage returns), at the start, periodically and at the end."""

from __future__ import annotations

import io
import logging

import pytest

from pi05_ros.engine.progress import progress_bar


def test_lines_on_a_stream_that_is_not_a_terminal() -> None:
    stream = io.StringIO()
    with progress_bar(4, "timing", stream=stream, log_every_s=0.0, unit="run") as bar:
        for _ in range(4):
            bar.update()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("timing:") and "0/4" in lines[0]
    assert "4/4" in lines[-1] and "100%" in lines[-1]


def test_lines_go_to_a_logger_when_given(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    log = logging.getLogger("pi05_ros.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name), progress_bar(2, "loading", log=log, stream=stream) as bar:
        bar.update(2)
    assert stream.getvalue() == "" and "loading" in caplog.text and "100%" in caplog.text

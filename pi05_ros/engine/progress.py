"""Progress of long steps (loading a checkpoint, a benchmark run): a tqdm bar on a terminal, a plain line every
few seconds anywhere else (a log file, CI, a ROS node's log), so logs hold progress without carriage returns."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm


class _Lines:
    """A stream for tqdm that turns each of its refreshes into one line, on a stream or a logger."""

    def __init__(self, stream: TextIO, log: logging.Logger | None) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> None:
        line = text.strip("\r\n").rstrip()
        if not line:
            return
        if self._log is not None:
            self._log.info("%s", line)
        else:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def progress_bar(total: float, desc: str, *, log: logging.Logger | None = None, log_every_s: float = 5.0,
                 stream: TextIO | None = None, **options: Any) -> tqdm:
    """A tqdm bar for `total` units on `stream` (stderr) when it is a terminal; otherwise one line at the start,
    every `log_every_s` and at the end, written to `log` (INFO) when given, else to `stream`.

    `options` go to tqdm (unit, unit_scale, leave, ...). Use it as a context manager or close() it."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(total=total, desc=desc, file=stream, dynamic_ncols=True, **options)
    return tqdm(total=total, desc=desc, file=_Lines(stream, log), mininterval=log_every_s, maxinterval=log_every_s,
                ncols=100, ascii=True, **options)

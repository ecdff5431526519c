"""The node's log of problems: each distinct problem is logged once when it starts and once when it clears.

A problem is distinct by its code, its subject (the input it concerns, the exception type of a failed inference)
and its message apart from the numbers in it: a stale input's growing age or a joint's changing value is the same
problem, a camera whose wrong encoding turns into a wrong data length has a new one. Sources report what they see
(`seen`): the input callbacks as each bad message arrives, the inference thread at every tick, the diagnostics
timer once a second with everything /diagnostics shows. A problem not seen for `clear_after_s` is logged as
cleared at the next `sweep`, so one that comes and goes within that time (an input that flickers) stays one
problem instead of a line per flicker. Each problem has its own state: one input's errors never hide another's
(rclpy's throttle is per call site, so inputs sharing one log call shared one throttle). Messages are shortened to
`text_limit` characters. No ROS imports: the node gives the function that writes a line.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pi05_ros.ros.problems import Level, Problem, ProblemCode, shorten

CLEAR_AFTER_S = 2.0  # a problem unseen this long is over (more than the 1 s between diagnostics)
LOG_TEXT_LIMIT = 500  # characters of a problem's message in the log

# Logged elsewhere, once, when they happen: the configure failure and a failed load (as "configure failed"), the
# loading phase (as "model ready"), commands holding or resuming (by the node at the control tick that changes it).
NOT_LOGGED = frozenset({ProblemCode.CONFIGURE_FAILED, ProblemCode.LOAD_FAILED, ProblemCode.LOADING,
                        ProblemCode.HOLDING})

LineWriter = Callable[[Level, str], None]  # level (WARN/ERROR for a start, OK for a clear), text
_NUMBERS = re.compile(r"\d[\d.]*(?:[eE][-+]?\d+)?")  # 12, 0.53, 1e+39


def problem_key(problem: Problem) -> tuple[ProblemCode, str, str]:
    """What makes a problem distinct: code, subject, and the message with every number blanked."""
    return problem.code, problem.subject, _NUMBERS.sub("#", problem.message)


@dataclass
class _Active:
    problem: Problem
    started: float
    last_seen: float
    sightings: int = 1


class ProblemLog:
    """See the module docstring. Thread-safe: callbacks, the inference thread and the timer report at once."""

    def __init__(self, write: LineWriter, *, clear_after_s: float = CLEAR_AFTER_S, text_limit: int = LOG_TEXT_LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._clear_after = clear_after_s
        self._limit = text_limit
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[tuple[ProblemCode, str, str], _Active] = {}

    def seen(self, problems: Iterable[Problem], now: float | None = None) -> None:
        """These problems are present now; each new one is logged."""
        now = self._clock() if now is None else now
        started: list[Problem] = []
        with self._lock:
            for problem in problems:
                if problem.code in NOT_LOGGED:
                    continue
                key = problem_key(problem)
                active = self._active.get(key)
                if active is None:
                    self._active[key] = _Active(problem, now, now)
                    started.append(problem)
                else:
                    active.last_seen, active.problem = now, problem
                    active.sightings += 1
        for problem in started:  # outside the lock: a log call may take a while
            self._write(problem.level, shorten(problem.message, self._limit))

    def sweep(self, now: float | None = None) -> None:
        """Log as cleared every problem not seen for clear_after_s."""
        now = self._clock() if now is None else now
        with self._lock:
            over = [key for key, active in self._active.items() if now - active.last_seen >= self._clear_after]
            cleared = [self._active.pop(key) for key in over]
        for active in cleared:
            lasted = active.last_seen - active.started
            self._write(Level.OK, shorten(f"cleared after {lasted:.1f} s: {active.problem.message}", self._limit))

    def active(self) -> list[Problem]:
        """The problems logged as started and not yet as cleared."""
        with self._lock:
            return [active.problem for active in self._active.values()]

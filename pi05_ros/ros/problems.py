"""Why the node publishes nothing (or warns): a level, a code that says which kind of problem, and a message
for the user that names the cause and the fix. No ROS imports."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Level(enum.IntEnum):
    """Same values as diagnostic_msgs/DiagnosticStatus levels."""

    OK = 0
    WARN = 1
    ERROR = 2


class ProblemCode(enum.StrEnum):
    """The kind of a problem; skipped ticks are counted under the values (`skipped.<value>` on /diagnostics)."""

    MISSING_INPUT = "missing_input"  # an input never had a message
    STALE_INPUT = "stale_input"  # its newest message is older than max_input_age_s
    BAD_INPUT = "bad_input"  # a message could not be converted, or the policy refused the observation
    NO_INSTRUCTION = "no_instruction"
    INFERENCE_FAILED = "inference_failed"  # the engine raised
    LOADING = "loading"  # the model is loading or warming up
    LOAD_FAILED = "load_failed"
    LOW_RATE = "low_rate"  # the achieved rate stayed below rate_hz
    NO_CLOCK = "no_clock"  # use_sim_time and no /clock message yet
    BAD_STAMP = "bad_stamp"  # an input's stamp was not used as is (execution/stamps.py)
    CONFIGURE_FAILED = "configure_failed"  # a managed node's configure failed (it stays unconfigured)
    HOLDING = "holding"  # commands hold (or stop) while the node is active: the reason is in the message
    CLIPPING = "clipping"  # joint limits clip many commands
    NOT_COMMANDING = "not_commanding"  # the node cannot command (a demo model without allow_demo_commands)
    # --- issue 11
    PROMPT_TRUNCATED = "prompt_truncated"  # the prompt has more tokens than the model keeps (chunks still come)
    PUBLISH_FAILED = "publish_failed"  # handing a chunk to its publishers or the commander raised


@dataclass(frozen=True)
class Problem:
    level: Level
    code: ProblemCode
    message: str
    # What it concerns (an input's name, an exception type): with the code it tells distinct problems apart, so
    # the log (problem_log.py) says once when each starts and once when it ends while its message may change.
    subject: str = ""


# When a tick has several problems, it is counted under the first of these it has.
_SKIP_ORDER = (ProblemCode.BAD_INPUT, ProblemCode.STALE_INPUT, ProblemCode.NO_CLOCK, ProblemCode.NO_INSTRUCTION,
               ProblemCode.MISSING_INPUT)


def skip_reason(problems: Iterable[Problem]) -> ProblemCode:
    """The one code a tick without inference is counted under."""
    codes = {problem.code for problem in problems}
    return next((code for code in _SKIP_ORDER if code in codes), ProblemCode.MISSING_INPUT)


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, saying how long it was (for logs and /diagnostics)."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} characters)"
    return text[: max(0, limit - len(suffix))] + suffix


def quoted_short(text: str, limit: int) -> str:
    """`text` quoted (repr), its first `limit` characters when longer, saying how long it was."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"

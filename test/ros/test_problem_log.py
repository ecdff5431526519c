"""The problem log: each distinct problem once when it starts and once when it clears, per input, shortened."""

from __future__ import annotations

import threading

from pi05_ros.ros.problem_log import CLEAR_AFTER_S, ProblemLog
from pi05_ros.ros.problems import Level, Problem, ProblemCode, quoted_short, shorten


def make_log() -> tuple[ProblemLog, list[tuple[Level, str]]]:
    lines: list[tuple[Level, str]] = []
    return ProblemLog(lambda level, text: lines.append((level, text)), text_limit=120), lines


def stale(name: str, age: float) -> Problem:
    return Problem(Level.WARN, ProblemCode.STALE_INPUT, f"'{name}' is stale: {age:.2f} s old", name)


def test_a_problem_is_logged_when_it_starts_and_when_it_clears_not_while_it_lasts() -> None:
    log, lines = make_log()
    for tick in range(50):  # 5 s of a stale input seen at 10 Hz, its age in the message growing
        log.seen([stale("base_image", 0.5 + tick / 10)], now=tick / 10)
        log.sweep(now=tick / 10)
    assert lines == [(Level.WARN, "'base_image' is stale: 0.50 s old")]
    log.sweep(now=4.9 + CLEAR_AFTER_S - 0.01)
    assert len(lines) == 1  # not yet: unseen for less than clear_after_s
    log.sweep(now=4.9 + CLEAR_AFTER_S)
    assert lines[1] == (Level.OK, "cleared after 4.9 s: 'base_image' is stale: 5.40 s old")
    assert log.active() == []


def test_each_input_has_its_own_problem_so_none_hides_another() -> None:
    log, lines = make_log()
    bad = [Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"'{name}': bad", name) for name in ("cam_a", "cam_b")]
    for t in range(20):
        log.seen([bad[0]], now=t * 0.01)  # cam_a fails at 100 Hz
    log.seen([bad[1]], now=0.3)  # cam_b's first error comes while cam_a's lasts
    assert lines == [(Level.ERROR, "'cam_a': bad"), (Level.ERROR, "'cam_b': bad")]
    log.seen([bad[1]], now=3.0)
    log.sweep(now=3.0)  # cam_a unseen since 0.19 s: cleared; cam_b still there
    assert lines[2] == (Level.OK, "cleared after 0.2 s: 'cam_a': bad") and len(lines) == 3


def test_a_flickering_problem_stays_one_problem_and_one_that_returns_later_is_logged_again() -> None:
    log, lines = make_log()
    for t in (0.0, 1.5, 3.0, 4.5):  # comes and goes, never unseen for clear_after_s
        log.seen([stale("cam", 1.0)], now=t)
        log.sweep(now=t + 1.0)
    assert len(lines) == 1
    log.sweep(now=10.0)
    log.seen([stale("cam", 1.0)], now=20.0)
    assert [level for level, _ in lines] == [Level.WARN, Level.OK, Level.WARN]


def test_codes_logged_elsewhere_are_skipped_and_long_messages_shortened() -> None:
    log, lines = make_log()
    log.seen([Problem(Level.WARN, ProblemCode.LOADING, "loading model"),
              Problem(Level.WARN, ProblemCode.HOLDING, "commands hold: x"),
              Problem(Level.WARN, ProblemCode.PROMPT_TRUNCATED, "y" * 100_000, "instruction")], now=0.0)
    assert len(lines) == 1 and len(lines[0][1]) == 120 and lines[0][1].endswith("... (100000 characters)")
    assert shorten("short", 120) == "short"
    assert quoted_short("pick", 10) == "'pick'" and quoted_short("x" * 50, 4) == "'xxxx'... (50 characters)"


def test_reports_from_several_threads_log_each_problem_once() -> None:
    log, lines = make_log()
    problem = Problem(Level.ERROR, ProblemCode.INFERENCE_FAILED, "inference failed: RuntimeError: CUDA", "RuntimeError")

    def report() -> None:
        for _ in range(2000):
            log.seen([problem])

    threads = [threading.Thread(target=report) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lines == [(Level.ERROR, "inference failed: RuntimeError: CUDA")]


def test_a_new_error_on_the_same_input_is_a_new_problem_but_changing_numbers_are_not() -> None:
    log, lines = make_log()

    def joint(value: float) -> Problem:
        return Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"'joint_states': joint_3 = {value:g} beyond 10000",
                       "joint_states")

    for t, value in enumerate((12345.5, 23456.25, 3e7)):  # a drifting fault: one problem
        log.seen([joint(value)], now=t * 0.1)
    encoding = Problem(Level.ERROR, ProblemCode.BAD_INPUT, "'cam': encoding 'yuv422' is not supported", "cam")
    length = Problem(Level.ERROR, ProblemCode.BAD_INPUT, "'cam': data is 57120 bytes but height*step = 57600", "cam")
    log.seen([encoding], now=1.0)
    log.seen([length], now=1.1)
    assert [text for _, text in lines] == ["'joint_states': joint_3 = 12345.5 beyond 10000", encoding.message,
                                           length.message]
    log.sweep(now=3.05)  # the encoding error was last seen at 1.0: over; the data length error goes on
    assert lines[-1] == (Level.OK, f"cleared after 0.0 s: {encoding.message}") and len(lines) == 5

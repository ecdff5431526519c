"""Collecting the freshest complete observation from real input buffers, and why a tick has none."""

from __future__ import annotations

import time

import numpy as np

from pi05_ros.ros.inputs import InputBuffers, StampRule
from pi05_ros.ros.observation import ObservationCollector
from pi05_ros.ros.problems import Level, Problem, ProblemCode, skip_reason
from pi05_ros.ros.settings import CameraConfig

CAMERAS = (CameraConfig("base_image", "base_0_rgb", "raw"),
           CameraConfig("wrist_image", "left_wrist_0_rgb", "compressed"))


def _fill(inputs: InputBuffers, stamp_ns: int) -> None:
    for name, buffer in inputs.cameras.items():
        frame = buffer.spare((4, 6, 3))
        frame[...] = len(name)
        buffer.commit(frame, stamp_ns)
    joints = inputs.joints.spare((7,))
    joints[...] = 0.5
    inputs.joints.commit(joints, stamp_ns + 10)


def test_complete_observation_carries_every_input_and_the_newest_stamp() -> None:
    inputs = InputBuffers([c.name for c in CAMERAS])
    _fill(inputs, 1_000)
    inputs.instruction.set("stack the blocks")
    observation, problems = ObservationCollector(inputs, CAMERAS, 0.5).collect("")
    assert problems == () and observation is not None
    assert set(observation.images) == {"base_0_rgb", "left_wrist_0_rgb"}
    assert observation.images["base_0_rgb"].shape == (4, 6, 3) and np.all(observation.state == 0.5)
    assert observation.prompt == "stack the blocks" and observation.stamp_ns == 1_010


def test_missing_stale_and_bad_inputs_are_reported_with_codes() -> None:
    inputs = InputBuffers([c.name for c in CAMERAS])
    collector = ObservationCollector(inputs, CAMERAS, 0.5)
    observation, problems = collector.collect("")
    assert observation is None
    codes = [p.code for p in problems]
    assert codes == [ProblemCode.MISSING_INPUT] * 3 + [ProblemCode.NO_INSTRUCTION]
    assert "'wrist_image/compressed'" in problems[1].message  # the topic the user publishes on
    assert skip_reason(problems) is ProblemCode.NO_INSTRUCTION

    _fill(inputs, 1)
    observation, problems = collector.collect("wipe the table", now_ns=time.monotonic_ns() + 2_000_000_000)
    assert observation is None and {p.code for p in problems} == {ProblemCode.STALE_INPUT}
    assert "max_input_age_s 0.5" in problems[0].message and skip_reason(problems) is ProblemCode.STALE_INPUT

    stale = collector.freshness_problems(time.monotonic_ns() + 2_000_000_000)
    assert [p.code for p in stale] == [ProblemCode.STALE_INPUT] * 3  # the control loop's view, taking nothing
    assert collector.freshness_problems() == ()

    inputs.cameras["base_image"].fail("image encoding '16UC1' is not supported")
    observation, problems = collector.collect("wipe the table")
    assert observation is None and problems[0].level is Level.ERROR and problems[0].code is ProblemCode.BAD_INPUT
    assert skip_reason(problems) is ProblemCode.BAD_INPUT


def test_untrusted_stamps_follow_the_stamp_rule_on_the_given_clock() -> None:
    clock = {"now": 10_000_000_000}
    rule = StampRule(future_tolerance_ns=50_000_000, max_age_ns=500_000_000)
    inputs = InputBuffers([c.name for c in CAMERAS], clock_ns=lambda: clock["now"], stamp_rule=rule)
    joints = inputs.joints
    joints.commit(joints.spare((7,)), 0)  # zero: the arrival time is used
    assert joints.take().stamp_ns == 10_000_000_000 and "header.stamp 0" in joints.state().stamp_issue
    joints.commit(joints.spare((7,)), 9_900_000_000)  # a good stamp clears the issue
    assert joints.take().stamp_ns == 9_900_000_000 and joints.state().stamp_issue is None
    joints.commit(joints.spare((7,)), 99_000_000_000)  # a clock 89 s ahead
    assert joints.take().stamp_ns == 10_000_000_000 and "in the future" in joints.state().stamp_issue
    clock["now"] += 100_000_000
    joints.commit(joints.spare((7,)), 1)  # near the epoch: stale on arrival, not used
    state = joints.state()
    assert "before it arrived" in state.stamp_issue and state.bad_stamps == 3 and state.messages == 4
    assert state.age_s == 0.1  # the last usable message is 0.1 s old on this clock


def test_skip_reason_prefers_the_most_serious_code() -> None:
    def problem(code: ProblemCode) -> Problem:
        return Problem(Level.WARN, code, code.value)

    assert skip_reason([problem(ProblemCode.MISSING_INPUT), problem(ProblemCode.STALE_INPUT)]) == "stale_input"
    assert skip_reason([problem(ProblemCode.NO_INSTRUCTION), problem(ProblemCode.MISSING_INPUT)]) == "no_instruction"
    assert skip_reason([]) is ProblemCode.MISSING_INPUT


def test_the_observation_stamp_is_never_an_untrusted_one() -> None:
    """What ActionChunk.header.stamp carries: zero, a day ahead and near-epoch stamps never go out as they are."""
    day = 86_400 * 1_000_000_000
    clock = {"now": 1_800_000_000 * 1_000_000_000}
    rule = StampRule(future_tolerance_ns=50_000_000, max_age_ns=500_000_000)
    inputs = InputBuffers([c.name for c in CAMERAS], clock_ns=lambda: clock["now"], stamp_rule=rule)
    inputs.instruction.set("stack")
    collector = ObservationCollector(inputs, CAMERAS, 0.5)
    for stamps in ((0, 0, 0), (clock["now"] + day,) * 3, (0, clock["now"] + day, clock["now"] - 10_000_000)):
        for buffer, stamp in zip((*inputs.cameras.values(), inputs.joints), stamps, strict=True):
            buffer.commit(buffer.spare((4, 6, 3) if buffer is not inputs.joints else (7,)), stamp)
        observation, problems = collector.collect("")
        assert problems == () and observation is not None
        assert clock["now"] - 500_000_000 <= observation.stamp_ns <= clock["now"], stamps
        clock["now"] += 1_000_000
    for buffer in (*inputs.cameras.values(), inputs.joints):
        buffer.commit(buffer.spare((4, 6, 3) if buffer is not inputs.joints else (7,)), 1)  # near the epoch
    clock["now"] += 600_000_000
    observation, problems = collector.collect("")
    assert observation is None and {p.code for p in problems} == {ProblemCode.STALE_INPUT}  # refused, then stale


def test_problems_name_their_input_and_an_empty_instruction_is_an_error() -> None:
    inputs = InputBuffers([c.name for c in CAMERAS])
    collector = ObservationCollector(inputs, CAMERAS, 0.5)
    _, problems = collector.collect("")
    assert [p.subject for p in problems] == ["base_image", "wrist_image", "joint_states", "instruction"]
    _fill(inputs, time.monotonic_ns())
    for text in ("", "  \n"):
        inputs.instruction.set(text)
        observation, problems = collector.collect("a default is not used once an instruction came")
        assert observation is None and [(p.level, p.code, p.subject) for p in problems] == [
            (Level.ERROR, ProblemCode.BAD_INPUT, "instruction")]
        assert "prompt is empty" in problems[0].message and skip_reason(problems) is ProblemCode.BAD_INPUT


def test_inputs_from_before_the_clock_went_back_are_stale() -> None:
    """Sim time jumps back (a bag replayed in a loop, a simulator reset): what arrived before says nothing about
    now, however young its age looks (negative)."""
    inputs = InputBuffers([c.name for c in CAMERAS])
    _fill(inputs, 1)
    inputs.instruction.set("stack the blocks")
    collector = ObservationCollector(inputs, CAMERAS, 0.5)
    back = time.monotonic_ns() - 30_000_000_000
    observation, problems = collector.collect("", now_ns=back)
    assert observation is None and {p.code for p in problems} == {ProblemCode.STALE_INPUT}
    assert "the clock went back 30.0" in problems[0].message and "waiting for a message after the jump" in \
        problems[0].message
    assert [p.code for p in collector.freshness_problems(back)] == [ProblemCode.STALE_INPUT] * 3
    assert collector.collect("")[0] is not None  # on the clock they arrived by, the same inputs are fresh

"""The freshest complete observation in the input buffers, or the problems that keep it from being complete;
and, for the control loop, whether the inputs are fresh right now. Ages are on the inputs' clock (the ROS
clock). No ROS imports: read by the inference and control threads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pi05_ros.engine.preprocess import PreparedView
from pi05_ros.ros.inputs import InputBuffers, LatestBuffer
from pi05_ros.ros.problems import Level, Problem, ProblemCode
from pi05_ros.ros.settings import CameraConfig

# An arrival time later than "now" by more than this means the ROS clock went back (sim time): such inputs are stale.
# Arrival and now come from one clock, so only the moment between reading them separates them when it did not.
CLOCK_BACK_TOLERANCE_S = 0.05


@dataclass(frozen=True)
class Observation:
    """One complete observation as the engine takes it."""

    images: dict[str, np.ndarray | PreparedView]  # model slot -> uint8 HxWx3 RGB, or the view resized on arrival
    state: np.ndarray  # float32 [state_dim]
    prompt: str
    stamp_ns: int  # newest stamp among the inputs used (after the stamp rule: execution/stamps.py)


def bad_input_problem(topic: str, name: str, error: str) -> Problem:
    """An input's newest message could not be used (ERROR): its conversion or an input rule refused it."""
    return Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"'{topic}': {error}", name)


def empty_instruction_problem(name: str, text: str) -> Problem:
    """The newest instruction is empty or only whitespace (ERROR): nothing is inferred until a non-empty one."""
    return Problem(Level.ERROR, ProblemCode.BAD_INPUT,
                   f"the newest '{name}' message is {'empty' if not text else 'only whitespace'}, so the task prompt "
                   f"is empty: nothing is inferred until a non-empty instruction arrives; publish one on '{name}'",
                   name)


class ObservationCollector:
    """Takes the newest value of every camera, the joint state and the instruction; checks each is there,
    convertible and younger than `max_input_age_s`."""

    def __init__(self, inputs: InputBuffers, cameras: tuple[CameraConfig, ...], max_input_age_s: float) -> None:
        self._inputs = inputs
        self._cameras = cameras
        self._max_age = max_input_age_s

    def _sources(self) -> list[tuple[str, str, LatestBuffer]]:
        sources = [(camera.topic, camera.slot, self._inputs.cameras[camera.name]) for camera in self._cameras]
        sources.append(("joint_states", "", self._inputs.joints))
        return sources

    def freshness_problems(self, now_ns: int | None = None) -> tuple[Problem, ...]:
        """Any thread, without taking values: why the inputs cannot drive the robot now (missing, unusable,
        stale); empty when every camera and the joint state are fresh."""
        now_ns = self._inputs.clock_ns() if now_ns is None else now_ns
        problems = []
        for topic, _, buffer in self._sources():
            state = buffer.state(now_ns)
            if state.error is not None:
                problems.append(bad_input_problem(topic, buffer.name, state.error))
            elif state.age_s is None:
                problems.append(Problem(Level.WARN, ProblemCode.MISSING_INPUT, f"no usable message yet on '{topic}'",
                                        buffer.name))
            elif not self._fresh(state.age_s):
                problems.append(self._stale(topic, buffer.name, state.age_s))
        return tuple(problems)

    def _fresh(self, age_s: float) -> bool:
        """Young enough, and not from before a backward jump of the clock (a negative age)."""
        return -CLOCK_BACK_TOLERANCE_S <= age_s <= self._max_age

    def _stale(self, topic: str, name: str, age_s: float) -> Problem:
        if age_s < 0:  # received "later" than now: messages from before a jump say nothing about the inputs now
            return Problem(Level.WARN, ProblemCode.STALE_INPUT,
                           f"'{topic}': the clock went back {-age_s:.2f} s since its newest message arrived (a bag "
                           "replayed in a loop, a simulator reset); waiting for a message after the jump", name)
        return Problem(Level.WARN, ProblemCode.STALE_INPUT,
                       f"'{topic}' is stale: newest message is {age_s:.2f} s old > max_input_age_s {self._max_age:g}; "
                       "check that its publisher runs", name)

    def collect(self, default_instruction: str,
                now_ns: int | None = None) -> tuple[Observation | None, tuple[Problem, ...]]:
        """The observation (and no problems), or None and every problem found."""
        now_ns = self._inputs.clock_ns() if now_ns is None else now_ns
        problems: list[Problem] = []
        images: dict[str, np.ndarray] = {}
        state: np.ndarray | None = None
        stamps: list[int] = []
        for topic, slot, buffer in self._sources():
            error = buffer.error
            if error is not None:
                problems.append(bad_input_problem(topic, buffer.name, error))
                continue
            sample = buffer.take()
            if sample is None:
                problems.append(Problem(Level.WARN, ProblemCode.MISSING_INPUT, f"no usable message yet on '{topic}'",
                                        buffer.name))
                continue
            age = (now_ns - sample.received_ns) / 1e9
            if not self._fresh(age):
                problems.append(self._stale(topic, buffer.name, age))
                continue
            stamps.append(sample.stamp_ns)
            if slot:
                images[slot] = sample.data
            else:
                state = sample.data
        instruction = self._inputs.instruction
        prompt = instruction.get()
        if prompt is None:
            prompt = default_instruction
            if not prompt:
                problems.append(Problem(
                    Level.WARN, ProblemCode.NO_INSTRUCTION, "no instruction yet: publish std_msgs/String on "
                    "'instruction' (transient local) or set default_instruction", instruction.name))
        elif not prompt.strip():
            problems.append(empty_instruction_problem(instruction.name, prompt))
        if problems or state is None:
            return None, tuple(problems)
        return Observation(images, state, prompt, max(stamps)), ()

"""The freshest complete observation in the input buffers, or the problems that keep it from being complete.
No ROS imports: read by the inference thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pi05_ros.ros.inputs import InputBuffers
from pi05_ros.ros.problems import Level, Problem, ProblemCode
from pi05_ros.ros.settings import CameraConfig


@dataclass(frozen=True)
class Observation:
    """One complete observation as the engine takes it."""

    images: dict[str, np.ndarray]  # model slot -> uint8 HxWx3 RGB
    state: np.ndarray  # float32 [state_dim]
    prompt: str
    stamp_ns: int  # newest header stamp among the inputs used


class ObservationCollector:
    """Takes the newest value of every camera, the joint state and the instruction; checks each is there,
    convertible and younger than `max_input_age_s`."""

    def __init__(self, inputs: InputBuffers, cameras: tuple[CameraConfig, ...], max_input_age_s: float) -> None:
        self._inputs = inputs
        self._cameras = cameras
        self._max_age = max_input_age_s

    def collect(self, default_instruction: str,
                now: float | None = None) -> tuple[Observation | None, tuple[Problem, ...]]:
        """The observation (and no problems), or None and every problem found."""
        now = time.monotonic() if now is None else now
        problems: list[Problem] = []
        images: dict[str, np.ndarray] = {}
        state: np.ndarray | None = None
        stamps: list[int] = []
        sources = [(camera.topic, camera.slot, self._inputs.cameras[camera.name]) for camera in self._cameras]
        sources.append(("joint_states", "", self._inputs.joints))
        for topic, slot, buffer in sources:
            error = buffer.error
            if error is not None:
                problems.append(Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"'{topic}': {error}"))
                continue
            sample = buffer.take()
            if sample is None:
                problems.append(Problem(Level.WARN, ProblemCode.MISSING_INPUT, f"no message yet on '{topic}'"))
                continue
            age = now - sample.received
            if age > self._max_age:
                problems.append(Problem(
                    Level.WARN, ProblemCode.STALE_INPUT,
                    f"'{topic}' is stale: newest message is {age:.2f} s old > max_input_age_s {self._max_age:g}; "
                    "check that its publisher runs"))
                continue
            stamps.append(sample.stamp_ns)
            if slot:
                images[slot] = sample.data
            else:
                state = sample.data
        prompt = self._inputs.instruction.get()
        if prompt is None:
            prompt = default_instruction
            if not prompt:
                problems.append(Problem(
                    Level.WARN, ProblemCode.NO_INSTRUCTION, "no instruction yet: publish std_msgs/String on "
                    "'instruction' (transient local) or set default_instruction"))
        if problems or state is None:
            return None, tuple(problems)
        return Observation(images, state, prompt, max(stamps)), ()

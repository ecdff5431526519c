"""The inference thread: owns the Policy (and its GPU buffers), picks the freshest complete observation at
`rate_hz` or on every frame of a trigger camera, runs the engine and hands the chunk to a publish callback.

No ROS imports: the node passes in the input buffers, a settings getter and the publish callback, so the
thread never waits on an executor and the executor never waits on it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pi05_ros.ros.inputs import InputBuffers

if TYPE_CHECKING:
    # The engine (torch) is imported in the worker thread, not at node import; params.py needs rclpy.
    from pi05_ros.engine.policy import Policy
    from pi05_ros.engine.runner import ActionChunk
    from pi05_ros.ros.settings import CameraConfig, RuntimeSettings

log = logging.getLogger(__name__)

RATE_WINDOW_S = 3.0  # achieved rate is measured over the chunks of the last few seconds
STATS_REFRESH_S = 0.5  # how often the worker recomputes the stage summary for diagnostics
WARMUP_PROMPT = "warm up"


class Level(enum.IntEnum):
    """Same values as diagnostic_msgs/DiagnosticStatus levels."""

    OK = 0
    WARN = 1
    ERROR = 2


class Phase(enum.Enum):
    LOADING = "loading model"
    WARMING_UP = "warming up"
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Problem:
    level: Level
    message: str


@dataclass(frozen=True)
class Observation:
    """One complete observation as the engine takes it."""

    images: dict[str, np.ndarray]  # model slot -> uint8 HxWx3 RGB
    state: np.ndarray  # float32 [state_dim]
    prompt: str
    stamp_ns: int  # newest header stamp among the inputs used


@dataclass(frozen=True)
class WorkerStatus:
    """A consistent snapshot for diagnostics."""

    phase: Phase
    fatal_error: str | None
    problems: tuple[Problem, ...]  # why the last tick published nothing; empty after a published chunk
    inferences: int
    published: int
    skipped: dict[str, int]  # reason -> ticks without inference
    overruns: int  # ticks missed because inference took longer than the period
    errors: int  # failed inferences (bad input or engine error)
    achieved_rate_hz: float  # chunks published over the last RATE_WINDOW_S seconds
    steady_for_s: float  # seconds since publishing last resumed (0 while nothing is being published)
    last_latency_ms: float | None
    last_denoise_steps: int | None
    stage_stats: dict[str, dict[str, float]]
    gpu_memory: dict[str, float] = field(default_factory=dict)  # MiB: allocated, reserved, peak


PublishFn = Callable[["ActionChunk", Observation, float, "RuntimeSettings"], None]


class InferenceWorker:
    """Runs in its own thread; see the module docstring."""

    def __init__(
        self,
        load_policy: Callable[[], Policy],
        inputs: InputBuffers,
        cameras: tuple[CameraConfig, ...],
        runtime: Callable[[], RuntimeSettings],
        publish: PublishFn,
        *,
        max_input_age_s: float,
        trigger_camera: str = "",
        warmup: int = 0,
    ) -> None:
        self._load_policy = load_policy
        self._inputs = inputs
        self._cameras = cameras
        self._runtime = runtime
        self._publish = publish
        self._max_age = max_input_age_s
        self._trigger_camera = trigger_camera
        self._warmup = warmup
        self.policy: Policy | None = None

        self._stop = False
        self._wake = threading.Event()  # stop, a parameter change, or a trigger frame
        self._trigger_pending = False
        self._thread = threading.Thread(target=self._main, name="pi05_inference", daemon=True)
        self.ready = threading.Event()  # set once the model is loaded and warmed up (or loading failed)

        self._lock = threading.Lock()  # guards the counters below
        self._phase = Phase.LOADING
        self._fatal_error: str | None = None
        self._problems: tuple[Problem, ...] = ()
        self._inferences = self._published = self._overruns = self._errors = 0
        self._skipped: dict[str, int] = {}
        self._publish_times: deque[float] = deque(maxlen=4096)
        self._streak_start: float | None = None  # first publish after the last tick that published nothing
        self._last_latency_ms: float | None = None
        self._last_steps: int | None = None
        self._stage_summary: dict[str, dict[str, float]] = {}
        self._gpu_memory: dict[str, float] = {}
        self._stats: Any = None  # engine StageStats of real (not warm-up) inferences
        self._stats_refreshed = 0.0

        if trigger_camera:
            inputs.cameras[trigger_camera].on_new_value(self._on_trigger_frame)

    # --- control, from other threads

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> bool:
        """Ask the thread to stop and wait up to `timeout` s; False if it is still inside an inference."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def wake(self) -> None:
        """Re-read the settings now (a run-time parameter changed)."""
        self._wake.set()

    def _on_trigger_frame(self) -> None:
        self._trigger_pending = True
        self._wake.set()

    @property
    def failed(self) -> bool:
        return self._phase is Phase.FAILED

    def status(self) -> WorkerStatus:
        now = time.monotonic()
        with self._lock:
            recent = sum(1 for t in self._publish_times if now - t <= RATE_WINDOW_S)
            rate = recent / RATE_WINDOW_S
            steady = 0.0 if self._streak_start is None else now - self._streak_start
            return WorkerStatus(
                phase=self._phase, fatal_error=self._fatal_error, problems=self._problems,
                inferences=self._inferences, published=self._published, skipped=dict(self._skipped),
                overruns=self._overruns, errors=self._errors, achieved_rate_hz=rate, steady_for_s=steady,
                last_latency_ms=self._last_latency_ms, last_denoise_steps=self._last_steps,
                stage_stats=self._stage_summary, gpu_memory=dict(self._gpu_memory),
            )

    # --- the thread

    def _main(self) -> None:
        try:
            self.policy = self._load_policy()
            self._set_phase(Phase.WARMING_UP)
            self._warm_up(self.policy)
        except Exception as exc:  # noqa: BLE001 - any load failure ends the node with its message
            from pi05_ros.engine.errors import Pi05Error

            message = str(exc) if isinstance(exc, Pi05Error | ValueError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Pi05Error | ValueError):
                log.exception("loading the policy failed")
            with self._lock:
                self._fatal_error = message
                self._phase = Phase.FAILED
            self.ready.set()
            return
        from pi05_ros.engine.timing import StageStats

        self._stats = StageStats()
        self._set_phase(Phase.RUNNING)
        self.ready.set()
        try:
            self._loop()
        finally:
            if self._phase is not Phase.FAILED:
                self._set_phase(Phase.STOPPED)

    def _set_phase(self, phase: Phase) -> None:
        with self._lock:
            self._phase = phase

    def _warm_up(self, policy: Policy) -> None:
        steps = self._runtime().denoise_steps
        images = {camera.slot: np.zeros((224, 224, 3), np.uint8) for camera in self._cameras}
        state = np.zeros(policy.state_dim, np.float32)
        for _ in range(self._warmup):
            if self._stop:
                return
            policy.infer(images, state, WARMUP_PROMPT, steps)

    def _loop(self) -> None:
        next_start: float | None = None
        rate_hz = self._runtime().rate_hz
        while not self._stop:
            settings = self._runtime()
            if settings.rate_hz != rate_hz:
                rate_hz = settings.rate_hz
                with self._lock:
                    self._streak_start = None  # the achieved rate is judged afresh against the new target
            if self._trigger_camera:
                self._wake.wait(0.2)
                self._wake.clear()
                if self._stop or not self._trigger_pending:
                    continue
                self._trigger_pending = False
            else:
                period = 1.0 / settings.rate_hz
                now = time.monotonic()
                if next_start is not None and now < next_start:
                    self._wake.wait(next_start - now)
                    self._wake.clear()
                    # Woken early by stop or a rate change: re-plan from the last start with the new period.
                    if self._stop:
                        break
                    if time.monotonic() < next_start - 1e-4:
                        next_start -= period - 1.0 / self._runtime().rate_hz
                        continue
                now = time.monotonic()
                if next_start is None or now - next_start > period:
                    if next_start is not None:
                        with self._lock:
                            self._overruns += int((now - next_start) // period)
                    next_start = now  # late by a whole period: restart the grid instead of bursting
                next_start += period
                settings = self._runtime()
            self._tick(settings)

    def _tick(self, settings: RuntimeSettings) -> None:
        observation, problems = self._collect(settings)
        if observation is None:
            reason = _skip_reason(problems)
            with self._lock:
                self._skipped[reason] = self._skipped.get(reason, 0) + 1
                self._problems = problems
                self._streak_start = None
            return
        from pi05_ros.engine.errors import InputError

        assert self.policy is not None
        start = time.perf_counter()
        try:
            chunk = self.policy.infer(observation.images, observation.state, observation.prompt,
                                      settings.denoise_steps)
        except InputError as exc:
            self._fail_tick(Problem(Level.ERROR, f"bad input: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - the node keeps running and reports it
            log.exception("inference failed")
            self._fail_tick(Problem(Level.ERROR, f"inference failed: {type(exc).__name__}: {exc}"))
            return
        latency = time.perf_counter() - start
        self._stats.add(chunk.timings)
        self._publish(chunk, observation, latency, settings)
        now = time.monotonic()
        with self._lock:
            self._inferences += 1
            self._published += 1
            self._publish_times.append(now)
            if self._streak_start is None:
                self._streak_start = now
            self._last_latency_ms = latency * 1e3
            self._last_steps = chunk.num_steps
            self._problems = ()
        if now - self._stats_refreshed >= STATS_REFRESH_S:
            self._stats_refreshed = now
            summary, memory = self._stats.summary(), _gpu_memory_mib(self.policy.device)
            with self._lock:
                self._stage_summary, self._gpu_memory = summary, memory

    def _fail_tick(self, problem: Problem) -> None:
        with self._lock:
            self._inferences += 1
            self._errors += 1
            self._problems = (problem,)
            self._streak_start = None

    def _collect(self, settings: RuntimeSettings) -> tuple[Observation | None, tuple[Problem, ...]]:
        """The freshest complete observation, or None and why there is none."""
        problems: list[Problem] = []
        now = time.monotonic()
        images: dict[str, np.ndarray] = {}
        state: np.ndarray | None = None
        stamps: list[int] = []
        sources = [(camera.topic, camera.slot, self._inputs.cameras[camera.name]) for camera in self._cameras]
        sources.append(("joint_states", "", self._inputs.joints))
        for topic, slot, buffer in sources:
            error = buffer.error
            if error is not None:
                problems.append(Problem(Level.ERROR, f"'{topic}': {error}"))
                continue
            sample = buffer.take()
            if sample is None:
                problems.append(Problem(Level.WARN, f"no message yet on '{topic}'"))
                continue
            age = now - sample.received
            if age > self._max_age:
                problems.append(Problem(
                    Level.WARN, f"'{topic}' is stale: newest message is {age:.2f} s old > max_input_age_s "
                    f"{self._max_age:g}; check that its publisher runs"))
                continue
            stamps.append(sample.stamp_ns)
            if slot:
                images[slot] = sample.data
            else:
                state = sample.data
        prompt = self._inputs.instruction.get()
        if prompt is None:
            prompt = settings.default_instruction
            if not prompt:
                problems.append(Problem(
                    Level.WARN, "no instruction yet: publish std_msgs/String on 'instruction' (transient local) "
                    "or set default_instruction"))
        if problems or state is None:
            return None, tuple(problems)
        return Observation(images, state, prompt, max(stamps)), ()


def _skip_reason(problems: tuple[Problem, ...]) -> str:
    if any(p.level is Level.ERROR for p in problems):
        return "bad_input"
    text = " ".join(p.message for p in problems)
    if "stale" in text:
        return "stale_input"
    if "no instruction" in text:
        return "no_instruction"
    return "missing_input"


def _gpu_memory_mib(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    import torch

    mib = 2.0**20
    return {
        "allocated": torch.cuda.memory_allocated(device) / mib,
        "reserved": torch.cuda.memory_reserved(device) / mib,
        "peak": torch.cuda.max_memory_allocated(device) / mib,
    }

"""The inference thread: owns the Policy (and its GPU buffers), picks the freshest complete observation at
`rate_hz` or on every frame of a trigger camera, runs the engine and hands the chunk to a publish callback.
It loads and warms up the model when started (the node's configure) and infers only while active (the node's
activate .. deactivate); `stop` ends it and drops the model (cleanup).

No ROS imports: the node passes in the input buffers, a settings getter and the publish callback, so the
thread never waits on an executor and the executor never waits on it. Its parts: the rate grid
(schedule.py), the observation collection (observation.py), and the counters diagnostics read (here).
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
from pi05_ros.ros.observation import Observation, ObservationCollector
from pi05_ros.ros.problems import Level, Problem, ProblemCode, shorten, skip_reason
from pi05_ros.ros.schedule import RateScheduler

if TYPE_CHECKING:
    # The engine (torch) is imported in the worker thread, not at node import.
    from pi05_ros.engine.policy import Policy
    from pi05_ros.engine.runner import ActionChunk
    from pi05_ros.ros.settings import CameraConfig, RuntimeSettings

log = logging.getLogger(__name__)

RATE_WINDOW_S = 3.0  # achieved rate is measured over the chunks of the last few seconds
STATS_REFRESH_S = 0.5  # how often the worker recomputes the stage summary for diagnostics
WARMUP_PROMPT = "warm up"
NO_CLOCK_MESSAGE = "no clock yet: use_sim_time is true and nothing has been published on /clock"
# Problems of a failed attempt, which stop commands until an inference succeeds
_FAILURE_CODES = (ProblemCode.BAD_INPUT, ProblemCode.INFERENCE_FAILED, ProblemCode.PUBLISH_FAILED)
TRACEBACKS_KEPT = 32  # distinct engine errors whose traceback was logged (each is logged once)


class Phase(enum.Enum):
    UNCONFIGURED = "unconfigured"  # the node has no worker (no model loaded)
    LOADING = "loading model"
    WARMING_UP = "warming up"
    INACTIVE = "inactive"  # loaded and warm, not inferring (lifecycle state inactive)
    RUNNING = "running"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerStatus:
    """A consistent snapshot for diagnostics."""

    phase: Phase
    fatal_error: str | None
    # why the last tick published nothing; empty after a published chunk (a report's: with the last failure since
    # the previous report, WorkerCounters.snapshot)
    problems: tuple[Problem, ...]
    inferences: int
    published: int
    skipped: dict[str, int]  # reason (a ProblemCode value) -> ticks without inference
    overruns: int  # ticks missed because inference took longer than the period
    errors: int  # failed inferences (bad input or engine error)
    achieved_rate_hz: float  # chunks published over the last RATE_WINDOW_S seconds
    steady_for_s: float  # seconds since publishing last resumed (0 while nothing is being published)
    last_latency_ms: float | None
    last_denoise_steps: int | None
    stage_stats: dict[str, dict[str, float]]
    gpu_memory: dict[str, float] = field(default_factory=dict)  # MiB: allocated, reserved, peak
    # --- issue 11: what the last published chunk's prompt was, and problems that do not stop publishing
    notices: tuple[Problem, ...] = ()  # e.g. the prompt was cut to the model's token limit
    prompt: PromptFacts | None = None

    @classmethod
    def without_worker(cls) -> WorkerStatus:
        """What diagnostics shows while the node has no worker (unconfigured)."""
        return cls(Phase.UNCONFIGURED, None, (), 0, 0, {}, 0, 0, 0.0, 0.0, None, None, {})

    @property
    def rate_measured(self) -> bool:
        """Whether achieved_rate_hz covers a full window of steady publishing (before that it ramps up)."""
        return self.steady_for_s >= RATE_WINDOW_S


@dataclass(frozen=True)
class PromptFacts:
    """The prompt of the last published chunk, for diagnostics."""

    text: str
    tokens: int  # tokens the model saw (state included)
    max_tokens: int  # the model's max_token_len
    full_tokens: int  # tokens of the whole prompt; more than max_tokens: it was cut

    @property
    def truncated(self) -> bool:
        return self.full_tokens > self.max_tokens


def prompt_truncated_problem(facts: PromptFacts) -> Problem:
    return Problem(
        Level.WARN, ProblemCode.PROMPT_TRUNCATED,
        f"the instruction is {facts.full_tokens} tokens with the state, more than this model's max_token_len "
        f"{facts.max_tokens}: the model does not see its last {facts.full_tokens - facts.max_tokens} tokens "
        f"(ending '{shorten(facts.text[-60:], 60)}'); shorten the instruction", "instruction")


class WorkerCounters:
    """The phase, counters and last values of the inference thread, under one lock: the thread writes them,
    diagnostics (the executor thread) reads a consistent `snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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
        self._notices: tuple[Problem, ...] = ()
        self._prompt: PromptFacts | None = None
        # The last failed attempt since the last diagnostics report: failures between successes (every other
        # inference, say) are reported even when each report happens to come after a success.
        self._unreported_failure: Problem | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    def set_phase(self, phase: Phase, fatal_error: str | None = None) -> None:
        with self._lock:
            self._phase = phase
            if fatal_error is not None:
                self._fatal_error = fatal_error

    def skipped_tick(self, problems: tuple[Problem, ...]) -> None:
        """A tick found no complete observation."""
        reason = skip_reason(problems).value
        with self._lock:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            self._problems = problems
            self._streak_start = None

    def paused(self) -> None:
        """Inference stops (deactivated): the last tick's problems are no longer what the node sees, and the rate
        is measured afresh over a full window of publishing after the pause."""
        with self._lock:
            self._problems = ()
            self._notices = ()
            self._streak_start = None
            self._unreported_failure = None

    def failed_inference(self, problem: Problem) -> None:
        with self._lock:
            self._inferences += 1
            self._errors += 1
            self._problems = (problem,)
            self._streak_start = None
            self._unreported_failure = problem

    def published_chunk(self, now: float, latency_s: float, num_steps: int, prompt: PromptFacts | None = None,
                        notices: tuple[Problem, ...] = ()) -> None:
        with self._lock:
            self._inferences += 1
            self._published += 1
            self._publish_times.append(now)
            if self._streak_start is None:
                self._streak_start = now
            self._last_latency_ms = latency_s * 1e3
            self._last_steps = num_steps
            self._problems = ()
            self._prompt, self._notices = prompt, notices

    def clear_failure(self) -> None:
        """An inference succeeded: the last attempt's failure is over (before its chunk is published)."""
        with self._lock:
            self._problems = tuple(p for p in self._problems if p.code not in _FAILURE_CODES)

    def last_failure(self) -> str | None:
        """The message of the last attempt when it was a failed inference (bad input or engine error)."""
        with self._lock:
            failed = [p for p in self._problems if p.code in _FAILURE_CODES and p.level is Level.ERROR]
            return failed[0].message if failed and self._problems else None

    def missed_ticks(self, count: int) -> None:
        with self._lock:
            self._overruns += count

    def rate_changed(self) -> None:
        """rate_hz changed: the achieved rate is judged afresh against the new target."""
        with self._lock:
            self._streak_start = None

    def set_stage_summary(self, summary: dict[str, dict[str, float]], gpu_memory: dict[str, float]) -> None:
        with self._lock:
            self._stage_summary, self._gpu_memory = summary, gpu_memory

    def snapshot(self, now: float | None = None, report: bool = False) -> WorkerStatus:
        """The counters now. `report` (the diagnostics publisher's call): the problems also name the last failed
        attempt since the previous report when the last attempt succeeded, so that a report between intermittent
        failures still shows them (at 10 Hz with every other inference failing, a 1 Hz report could otherwise
        always fall after a success); the next report forgets it unless another failure came."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = sum(1 for t in self._publish_times if now - t <= RATE_WINDOW_S)
            steady = 0.0 if self._streak_start is None else now - self._streak_start
            problems = self._problems
            if report:
                missed, self._unreported_failure = self._unreported_failure, None
                if missed is not None and missed not in problems:  # the last attempt's own failure: named once
                    problems = (missed, *problems)
            return WorkerStatus(
                phase=self._phase, fatal_error=self._fatal_error, problems=problems,
                inferences=self._inferences, published=self._published, skipped=dict(self._skipped),
                overruns=self._overruns, errors=self._errors, achieved_rate_hz=recent / RATE_WINDOW_S,
                steady_for_s=steady, last_latency_ms=self._last_latency_ms, last_denoise_steps=self._last_steps,
                stage_stats=self._stage_summary, gpu_memory=dict(self._gpu_memory), notices=self._notices,
                prompt=self._prompt,
            )


# chunk, its observation, inference wall time (s), ROS clock (ns) when its tick started, and the time (s) from the
# tick's start to now on a steady clock (the node judges the chunk by the settings of the moment, not its tick's)
PublishFn = Callable[["ActionChunk", Observation, float, int, float], None]
# (observation, settings, inference start ns) -> the engine's RtcRequest for this inference, or None
GuidanceFn = Callable[[Observation, "RuntimeSettings", int], Any]


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
        clock_ns: Callable[[], int] = time.monotonic_ns,
        guidance: GuidanceFn | None = None,
        on_problems: Callable[[tuple[Problem, ...]], None] | None = None,
    ) -> None:
        self._load_policy = load_policy
        self._guidance = guidance  # real-time chunking: what the new chunk must agree with (node, blend rtc)
        self._on_problems = on_problems  # told what each tick that published nothing found (the problem log)
        self._tracebacks_logged: deque[str] = deque(maxlen=TRACEBACKS_KEPT)
        self._prompt_full_tokens: tuple[str, int] | None = None  # (prompt, its full token count), the last one cut
        self._cameras = cameras
        self._runtime = runtime
        self._publish = publish
        self._trigger_camera = trigger_camera
        self._warmup = warmup
        self._clock_ns = clock_ns
        self.policy: Policy | None = None
        self._active = threading.Event()  # infer only while set (lifecycle state active)

        self._stop = False
        self._wake = threading.Event()  # stop, a parameter change, or a trigger frame
        self._trigger_pending = False
        self._thread = threading.Thread(target=self._main, name="pi05_inference", daemon=True)
        self.ready = threading.Event()  # set once the model is loaded and warmed up (or loading failed)

        self._collector = ObservationCollector(inputs, cameras, max_input_age_s)
        self._counters = WorkerCounters()
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

    def set_active(self, active: bool) -> None:
        """Infer (True) or pause after the inference in flight (False), keeping the model loaded."""
        if active:
            self._active.set()
        else:
            self._active.clear()
            self._counters.paused()
        if self._counters.phase in (Phase.RUNNING, Phase.INACTIVE):
            self._counters.set_phase(Phase.RUNNING if active else Phase.INACTIVE)
        self._wake.set()

    def last_failure(self) -> str | None:
        return self._counters.last_failure()

    def wake(self) -> None:
        """Re-read the settings now (a run-time parameter changed)."""
        self._wake.set()

    def _on_trigger_frame(self) -> None:
        self._trigger_pending = True
        self._wake.set()

    @property
    def failed(self) -> bool:
        return self._counters.phase is Phase.FAILED

    def status(self) -> WorkerStatus:
        return self._counters.snapshot()

    def report_status(self) -> WorkerStatus:
        """status() for a diagnostics report: with the failures since the previous report (WorkerCounters)."""
        return self._counters.snapshot(report=True)

    # --- the thread

    def _main(self) -> None:
        try:
            self.policy = self._load_policy()
            self._counters.set_phase(Phase.WARMING_UP)
            self._warm_up(self.policy)
        except Exception as exc:  # noqa: BLE001 - any load failure ends the node with its message
            from pi05_ros.engine.errors import Pi05Error

            message = str(exc) if isinstance(exc, Pi05Error | ValueError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, Pi05Error | ValueError):
                log.exception("loading the policy failed")
            self._counters.set_phase(Phase.FAILED, message)
            self.ready.set()
            return
        from pi05_ros.engine.timing import StageStats

        self._stats = StageStats()
        self._counters.set_phase(Phase.RUNNING if self._active.is_set() else Phase.INACTIVE)
        self.ready.set()
        try:
            self._loop()
        finally:
            if self._counters.phase is not Phase.FAILED:
                self._counters.set_phase(Phase.STOPPED)

    def _warm_up(self, policy: Policy) -> None:
        if not self._warmup:
            return
        steps = self._runtime().denoise_steps
        images = {camera.slot: np.zeros((224, 224, 3), np.uint8) for camera in self._cameras}
        state = policy.example_state()
        for _ in range(self._warmup):
            if self._stop:
                return
            policy.infer(images, state, WARMUP_PROMPT, steps)

    def _loop(self) -> None:
        scheduler = RateScheduler()
        rate_hz = self._runtime().rate_hz
        while not self._stop:
            if not self._active.is_set():
                self._active.wait(0.1)
                scheduler = RateScheduler()  # a new grid from activation on, no overruns counted for the pause
                continue
            settings = self._runtime()
            if settings.rate_hz != rate_hz:
                rate_hz = settings.rate_hz
                self._counters.rate_changed()
            if self._trigger_camera:
                self._wake.wait(0.2)
                self._wake.clear()
                if self._stop or not self._trigger_pending:
                    continue
                self._trigger_pending = False
            else:
                period = 1.0 / settings.rate_hz
                wait = scheduler.wait_s(time.monotonic())
                if wait > 0:
                    self._wake.wait(wait)
                    self._wake.clear()
                    if self._stop:
                        break
                    # Woken early by a rate change: re-plan from the last start with the new period.
                    if scheduler.woken_early(time.monotonic()):
                        scheduler.replan(period, 1.0 / self._runtime().rate_hz)
                        continue
                missed = scheduler.start(time.monotonic(), period)
                if missed:
                    self._counters.missed_ticks(missed)
                settings = self._runtime()
            self._tick(settings)

    def _tick(self, settings: RuntimeSettings) -> None:
        started_ns = self._clock_ns()
        started_steady = time.monotonic()
        if started_ns <= 0:  # use_sim_time and no /clock yet
            self._skipped((Problem(Level.WARN, ProblemCode.NO_CLOCK, NO_CLOCK_MESSAGE),))
            return
        observation, problems = self._collector.collect(settings.default_instruction, started_ns)
        if observation is None:
            self._skipped(problems)
            return
        from pi05_ros.engine.errors import InputError

        policy = self.policy  # a stop that timed out waiting for this inference sets self.policy to None
        assert policy is not None
        start = time.perf_counter()
        try:
            rtc = self._guidance(observation, settings, started_ns) if self._guidance else None
            chunk = policy.infer(observation.images, observation.state, observation.prompt,
                                 settings.denoise_steps, **({"rtc": rtc} if rtc is not None else {}))
        except InputError as exc:
            if self._active.is_set():  # a deactivation during it cleared the problems: it stays paused
                self._failed(Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"bad input: {exc}", "observation"))
            return
        except Exception as exc:  # noqa: BLE001 - the node keeps running and reports it
            if self._stop or not self._active.is_set():  # e.g. a remote policy's connection, shut by the stop
                return
            self._log_traceback_once("inference failed", exc)
            self._failed(Problem(Level.ERROR, ProblemCode.INFERENCE_FAILED,
                                 f"inference failed: {type(exc).__name__}: {shorten(str(exc), 300)}",
                                 type(exc).__name__))
            return
        latency = time.perf_counter() - start
        if self._stop or not self._active.is_set():  # stopped or deactivated meanwhile: its chunk is not wanted,
            return  # and counting it would start the rate window of a paused node
        self._stats.add(chunk.timings)
        if not np.isfinite(chunk.actions).all():  # a GPU fault or an overflow: nothing of it may go out
            bad = int((~np.isfinite(chunk.actions)).sum())
            self._failed(Problem(Level.ERROR, ProblemCode.INFERENCE_FAILED,
                                 f"inference returned {bad} non-finite action value(s) (NaN/inf) of "
                                 f"{chunk.actions.size}; nothing was published. A numeric fault in the engine "
                                 "(fp8 overflow, a GPU error): check /diagnostics' precision, restart the node if it "
                                 "persists", "non_finite_actions"))
            return
        # This inference succeeded: an earlier failure no longer stops commands, also not this chunk's own.
        self._counters.clear_failure()
        try:
            self._publish(chunk, observation, latency, started_ns, time.monotonic() - started_steady)
        except Exception as exc:  # noqa: BLE001 - a chunk that cannot be published must not end the thread
            self._log_traceback_once("publishing a chunk failed", exc)
            self._failed(Problem(Level.ERROR, ProblemCode.PUBLISH_FAILED,
                                 f"publishing a chunk failed: {type(exc).__name__}: {shorten(str(exc), 300)}",
                                 type(exc).__name__))
            return
        now = time.monotonic()
        prompt = self._prompt_facts(observation, chunk)
        notices = (prompt_truncated_problem(prompt),) if prompt is not None and prompt.truncated else ()
        self._counters.published_chunk(now, latency, chunk.num_steps, prompt, notices)
        if notices and self._on_problems is not None:
            self._on_problems(notices)
        if now - self._stats_refreshed >= STATS_REFRESH_S:
            self._stats_refreshed = now
            self._counters.set_stage_summary(self._stats.summary(), _gpu_memory_mib(policy.device))

    def _skipped(self, problems: tuple[Problem, ...]) -> None:
        self._counters.skipped_tick(problems)
        if self._on_problems is not None:
            self._on_problems(problems)

    def _failed(self, problem: Problem) -> None:
        self._counters.failed_inference(problem)
        if self._on_problems is not None:
            self._on_problems((problem,))

    def _log_traceback_once(self, what: str, exc: Exception) -> None:
        """The traceback of each distinct error (type and message) once: at 10 Hz a persistent GPU error would
        otherwise print one per inference. Its start and end are logged by the problem log."""
        key = f"{type(exc).__name__}: {exc}"
        if key in self._tracebacks_logged:
            return
        self._tracebacks_logged.append(key)
        log.error("%s (traceback shown once for this error)", what, exc_info=exc)

    def _prompt_facts(self, observation: Observation, chunk: ActionChunk) -> PromptFacts | None:
        """How many tokens the chunk's prompt had. Only a prompt that filled every token may have been cut; its
        whole length is counted once per prompt (with the state of that first time: the state's few tokens may
        differ later by one or two)."""
        policy = self.policy
        max_tokens = int(getattr(getattr(policy, "config", None), "max_token_len", 0) or 0)
        if policy is None or not max_tokens or not chunk.num_prompt_tokens:
            return None
        full = chunk.num_prompt_tokens
        if full >= max_tokens:
            cached = self._prompt_full_tokens
            if cached is None or cached[0] != observation.prompt:
                cached = (observation.prompt, policy.prompt_tokens(observation.prompt, observation.state))
                self._prompt_full_tokens = cached
            full = cached[1]
        return PromptFacts(observation.prompt, chunk.num_prompt_tokens, max_tokens, full)


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

"""The node's `/diagnostics` status: stage latencies, rates, input ages, model facts, OK / WARN / ERROR.

Levels: ERROR when the last attempt failed (bad input, inference error) or the model could not load; WARN
when an input is missing or stale, no instruction is known, the model is still loading, or the achieved
rate is below target; OK otherwise. The demo model never hides: the message starts with DEMO MODEL. While
running, the message gives the measured rate against the configured target ("9.8 / 10 Hz target") once a
full window is measured, and says when the target is more than the device allows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from pi05_ros.ros.inputs import InputState
from pi05_ros.ros.problems import Level, Problem, ProblemCode
from pi05_ros.ros.settings import RuntimeSettings
from pi05_ros.ros.worker import Phase, WorkerStatus

RATE_WARN_FRACTION = 0.9  # below 90 % of rate_hz is a WARN, judged only over a full window of steady
# publishing, so a pause for bad or stale input is not reported again as a low rate after it ends
DEMO_BANNER = "DEMO MODEL (random weights, actions are meaningless)"


@dataclass(frozen=True)
class ModelFacts:
    """What diagnostics shows of the loaded model; filled once the worker has it."""

    description: str
    device: str
    precision: str
    is_demo: bool
    stage_names: tuple[str, ...]


def build_status(
    name: str,
    worker: WorkerStatus,
    inputs: Iterable[InputState],
    runtime: RuntimeSettings,
    model: ModelFacts | None,
    *,
    rate_mode: str,
    demo_requested: bool,
) -> DiagnosticStatus:
    """One DiagnosticStatus for the node. `rate_mode` is 'timer' or 'trigger:<camera>'."""
    problems: list[Problem] = list(worker.problems)
    if worker.phase is Phase.FAILED:
        problems.insert(0, Problem(Level.ERROR, ProblemCode.LOAD_FAILED, f"model failed to load: {worker.fatal_error}"))
    elif worker.phase in (Phase.LOADING, Phase.WARMING_UP):
        problems.insert(0, Problem(Level.WARN, ProblemCode.LOADING, f"{worker.phase.value}, no actions yet"))
    timer = rate_mode == "timer"
    device = model.device if model else "device"
    if (
        worker.phase is Phase.RUNNING
        and timer
        and not worker.problems
        and worker.rate_measured
        and worker.achieved_rate_hz < RATE_WARN_FRACTION * runtime.rate_hz
    ):
        total = worker.stage_stats.get("total", {}).get("p50")
        cause = f"; inference takes {total:.0f} ms (p50)" if total is not None else ""
        problems.append(Problem(
            Level.WARN, ProblemCode.LOW_RATE,
            f"rate {worker.achieved_rate_hz:.1f} Hz is below rate_hz {runtime.rate_hz:g}{cause}"
            + _over_capacity(worker, runtime, device)))

    level = max((p.level for p in problems), default=Level.OK)
    text = "; ".join(p.message for p in problems) or _running_text(worker, runtime, rate_mode, device)
    is_demo = model.is_demo if model is not None else demo_requested
    if is_demo:
        text = f"{DEMO_BANNER}: {text}"

    values: list[tuple[str, str]] = [
        ("model", model.description if model else ("demo (loading)" if demo_requested else "loading")),
        ("demo_model", str(is_demo).lower()),
        ("phase", worker.phase.value),
        # How many problems the message joins (with "; "): a monitor can tell one warning from several.
        ("problem_count", str(len(problems))),
        ("device", model.device if model else "?"),
        ("precision", model.precision if model else "?"),
        ("denoise_steps", str(runtime.denoise_steps)),
        ("last_chunk_denoise_steps", _optional(worker.last_denoise_steps)),
        ("rate_mode", rate_mode),
        ("target_rate_hz", f"{runtime.rate_hz:g}" if timer else "n/a"),
        ("achieved_rate_hz", f"{worker.achieved_rate_hz:.2f}"),
        # false while the rate window is not yet full of steady publishing (achieved_rate_hz still ramps up)
        ("rate_measured", str(worker.rate_measured).lower()),
        ("inferences", str(worker.inferences)),
        ("published_chunks", str(worker.published)),
        ("failed_inferences", str(worker.errors)),
        ("overruns", str(worker.overruns)),
        ("skipped_ticks", str(sum(worker.skipped.values()))),
    ]
    values += [(f"skipped.{reason}", str(count)) for reason, count in sorted(worker.skipped.items())]
    values.append(("last_latency_ms", _optional(worker.last_latency_ms, "{:.2f}")))
    stage_names = model.stage_names if model else tuple(worker.stage_stats)
    for stage in stage_names:
        stats = worker.stage_stats.get(stage)
        for stat in ("mean", "p50", "p99"):
            values.append((f"stage.{stage}.{stat}_ms", "n/a" if stats is None else f"{stats[stat]:.3f}"))
    dropped = 0
    for state in inputs:
        values.append((f"input.{state.name}.age_s", _optional(state.age_s, "{:.3f}", "never")))
        values.append((f"input.{state.name}.messages", str(state.messages)))
        if state.error:
            values.append((f"input.{state.name}.error", state.error))
        dropped += state.dropped
    values.append(("dropped_observations", str(dropped)))
    if worker.gpu_memory:
        values += [(f"gpu_memory.{k}_mib", f"{v:.1f}") for k, v in sorted(worker.gpu_memory.items())]
    else:
        values.append(("gpu_memory", "n/a (not on a GPU)"))

    return DiagnosticStatus(
        level=bytes([int(level)]),
        name=name,
        message=text,
        hardware_id=model.device if model else "",
        values=[KeyValue(key=k, value=v) for k, v in values],
    )


def build_array(status: DiagnosticStatus, stamp: object) -> DiagnosticArray:
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [status]
    return array


def _running_text(worker: WorkerStatus, runtime: RuntimeSettings, rate_mode: str, device: str) -> str:
    """The message while nothing is wrong: the measured rate against the target, once there is one."""
    if worker.published == 0:
        return "running, waiting for the first inference"
    if rate_mode != "timer":
        return f"running at {worker.achieved_rate_hz:.1f} Hz, one inference per {rate_mode.split(':', 1)[-1]} frame"
    if not worker.rate_measured:
        text = f"running, measuring the rate against the {runtime.rate_hz:g} Hz target"
    else:
        text = f"running at {worker.achieved_rate_hz:.1f} / {runtime.rate_hz:g} Hz target"
    return text + _over_capacity(worker, runtime, device)


def _over_capacity(worker: WorkerStatus, runtime: RuntimeSettings, device: str) -> str:
    """A note when one inference takes longer than a period of rate_hz: the target is more than this device allows."""
    total = worker.stage_stats.get("total", {}).get("p50")
    if not total or 1e3 / total >= runtime.rate_hz:
        return ""
    return f"; rate_hz {runtime.rate_hz:g} is more than this {device} allows (at most ~{1e3 / total:.1f} Hz)"


def _optional(value: float | int | None, fmt: str = "{}", missing: str = "n/a") -> str:
    return missing if value is None else fmt.format(value)

"""The node's `/diagnostics` status: stage latencies, rates, input ages, model facts, OK / WARN / ERROR.

Levels: ERROR when the last attempt failed (bad input, inference error) or the model could not load; WARN
when an input is missing or stale, no instruction is known, the model is still loading, or the achieved
rate is below target; OK otherwise. The demo model never hides: the message starts with DEMO MODEL. While
running, the message gives the measured rate against the configured target ("9.8 / 10 Hz target") once a
full window is measured, and says when the target is more than the device allows. What the node commands
(execution/) adds the lifecycle state, the timing of each chunk (observation age at inference start, inference
latency, age at publish, actions skipped for lateness), holds, limit clipping (WARN when frequent), the
control loop's jitter, and untrusted input stamps (WARN).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from pi05_ros.execution.commander import ExecutionStatus
from pi05_ros.execution.loop import LoopStats
from pi05_ros.ros.inputs import InputState
from pi05_ros.ros.problems import Level, Problem, ProblemCode, shorten
from pi05_ros.ros.settings import RuntimeSettings
from pi05_ros.ros.worker import Phase, WorkerStatus

RATE_WARN_FRACTION = 0.9  # below 90 % of rate_hz is a WARN, judged only over a full window of steady
# publishing, so a pause for bad or stale input is not reported again as a low rate after it ends
DEMO_BANNER = "DEMO MODEL (random weights, actions are meaningless)"
MESSAGE_PART_LIMIT = 1000  # characters of one problem in the status message (a list of 10,000 joint names ...)
PROMPT_TEXT_LIMIT = 200  # characters of the prompt shown as prompt.text


@dataclass(frozen=True)
class ModelFacts:
    """What diagnostics shows of the loaded model; filled once the worker has it."""

    description: str
    device: str
    precision: str
    is_demo: bool
    stage_names: tuple[str, ...]


@dataclass(frozen=True)
class CommandFacts:
    """What diagnostics shows of the commanding side (issue 13)."""

    lifecycle_state: str  # unconfigured, inactive, active, finalized
    execution: ExecutionStatus | None  # None before configure
    loop: LoopStats | None  # the control loop's, None while it does not run
    commands_off: str | None = None  # why no command is published at all (a demo model without permission)
    configure_error: str | None = None  # why the last configure failed
    rtc: tuple[int, int, float | None] | None = None  # blend rtc: (delay, overlap) of the last request, latency s


def gather_problems(
    worker: WorkerStatus,
    inputs: Iterable[InputState],
    runtime: RuntimeSettings,
    model: ModelFacts | None,
    *,
    rate_mode: str,
    commands: CommandFacts | None = None,
    input_problems: Iterable[Problem] = (),
) -> list[Problem]:
    """Every problem the status names, in the order its message joins them. `input_problems`: the inputs' own
    problems now (trigger mode: once the trigger camera is quiet no tick looks at the inputs)."""
    inputs = list(inputs)
    input_problems = list(input_problems)
    fresh = {(p.code, p.subject) for p in input_problems}  # seen now: the last tick's version is older
    problems: list[Problem] = [p for p in worker.problems if (p.code, p.subject) not in fresh] + input_problems
    if commands is not None:
        problems += _command_problems(commands, problems)
    problems += [Problem(Level.WARN, ProblemCode.BAD_STAMP, state.stamp_issue, state.name)
                 for state in inputs if state.stamp_issue]
    # An input whose newest message was refused is named even while no tick looks at it (inactive, loading).
    named = {(p.code, p.subject) for p in problems}
    problems += [Problem(Level.ERROR, ProblemCode.BAD_INPUT, f"'{state.name}': {state.error}", state.name)
                 for state in inputs if state.error and (ProblemCode.BAD_INPUT, state.name) not in named]
    problems += list(worker.notices)
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
    return problems


def build_status(
    name: str,
    worker: WorkerStatus,
    inputs: Iterable[InputState],
    runtime: RuntimeSettings,
    model: ModelFacts | None,
    *,
    rate_mode: str,
    demo_requested: bool,
    commands: CommandFacts | None = None,
    problems: list[Problem] | None = None,
) -> DiagnosticStatus:
    """One DiagnosticStatus for the node. `rate_mode` is 'timer' or 'trigger:<camera>'; `problems` as
    gather_problems gives them (computed here when not given)."""
    inputs = list(inputs)
    if problems is None:
        problems = gather_problems(worker, inputs, runtime, model, rate_mode=rate_mode, commands=commands)
    timer = rate_mode == "timer"
    device = model.device if model else "device"

    level = max((p.level for p in problems), default=Level.OK)
    text = "; ".join(shorten(p.message, MESSAGE_PART_LIMIT) for p in problems) or _running_text(
        worker, runtime, rate_mode, device)
    if commands is not None and commands.commands_off:
        text += f"; {commands.commands_off}"
    is_demo = model.is_demo if model is not None else demo_requested
    if is_demo:
        text = f"{DEMO_BANNER}: {text}"

    values: list[tuple[str, str]] = [
        ("model", model.description if model else "none (unconfigured)" if worker.phase is Phase.UNCONFIGURED
         else "demo (loading)" if demo_requested else "loading"),
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
            values.append((f"input.{state.name}.error", shorten(state.error, MESSAGE_PART_LIMIT)))
        if state.bad_stamps:
            values.append((f"input.{state.name}.bad_stamps", str(state.bad_stamps)))
        if state.stamp_issue:
            values.append((f"input.{state.name}.stamp_issue", state.stamp_issue))
        if state.prepare_ms is not None:  # the camera's frames are resized for the model as they arrive
            values.append((f"input.{state.name}.prepare_ms", f"{state.prepare_ms:.3f}"))
        dropped += state.dropped
    values.append(("dropped_observations", str(dropped)))
    prompt = worker.prompt
    values += [("prompt.tokens", _optional(prompt.tokens if prompt else None)),
               ("prompt.max_tokens", _optional(prompt.max_tokens if prompt else None)),
               ("prompt.truncated", "n/a" if prompt is None else str(prompt.truncated).lower()),
               ("prompt.text", "n/a" if prompt is None else shorten(prompt.text, PROMPT_TEXT_LIMIT))]
    if worker.gpu_memory:
        values += [(f"gpu_memory.{k}_mib", f"{v:.1f}") for k, v in sorted(worker.gpu_memory.items())]
    else:
        values.append(("gpu_memory", "n/a (not on a GPU)"))
    if commands is not None:
        values += _command_values(commands)

    return DiagnosticStatus(
        level=bytes([int(level)]),
        name=name,
        message=text,
        hardware_id=model.device if model else "",
        values=[KeyValue(key=k, value=v) for k, v in values],
    )


def _command_problems(commands: CommandFacts, already: list[Problem]) -> list[Problem]:
    found = []
    if commands.configure_error:
        found.append(Problem(Level.ERROR, ProblemCode.CONFIGURE_FAILED,
                             f"configure failed: {commands.configure_error}"))
    status = commands.execution
    if status is None or commands.lifecycle_state != "active":
        return found
    # the hold's reason is usually a problem already named (a stale input the worker found a moment earlier, with
    # another age): compared without their numbers, it is named once
    said = " ".join(_without_numbers(p.message) for p in already)
    if status.state in ("holding", "stopped") and status.reason and _without_numbers(status.reason) not in said:
        verb = "commands hold" if status.state == "holding" else "commands stopped"
        found.append(Problem(Level.WARN, ProblemCode.HOLDING, f"{verb}: {status.reason}"))
    if status.clipping_frequent:
        c = status.clipped
        found.append(Problem(
            Level.WARN, ProblemCode.CLIPPING,
            f"joint limits clipped {100 * status.clipped_recent_fraction:.0f} % of recent commands (position "
            f"{c.position}, velocity {c.velocity}, acceleration {c.acceleration} values so far); check the limits "
            "(robot_description, joint_limits.*) and that the policy fits this robot"))
    return found


def _without_numbers(text: str) -> str:
    return re.sub(r"[-+]?\d+(\.\d+)?", "#", text)


def _stat_values(key: str, stats: dict[str, float], last: float | None) -> list[tuple[str, str]]:
    out = [(f"{key}.last", _optional(last, "{:.2f}"))]
    out += [(f"{key}.{stat}", f"{stats[stat]:.2f}" if stat in stats else "n/a") for stat in ("p50", "p99", "max")]
    return out


def _rtc_values(rtc: tuple[int, int, float | None]) -> list[tuple[str, str]]:
    delay, overlap, latency = rtc
    return [("rtc.delay_actions", str(delay)), ("rtc.overlap_actions", str(overlap)),
            ("rtc.latency_estimate_ms", _optional(None if latency is None else latency * 1e3, "{:.1f}"))]


def _command_values(commands: CommandFacts) -> list[tuple[str, str]]:
    values = [("lifecycle_state", commands.lifecycle_state),
              ("execution.commands_enabled", "false" if commands.commands_off else "true")]
    status = commands.execution
    if status is not None:
        c = status.clipped
        values += [
            ("execution.mode", status.mode), ("execution.command_interface", status.interface),
            ("execution.on_stale", status.on_stale), ("execution.blend", status.blend),
            ("execution.state", status.state), ("execution.reason", status.reason or ""),
            ("execution.chunks", str(status.chunks)), ("execution.commands", str(status.commands)),
            ("execution.holds", str(status.holds)),
            *(_rtc_values(commands.rtc) if commands.rtc is not None else ()),
            ("execution.actions_skipped_late", str(status.skipped_late_total)),
            ("execution.actions_skipped_late_last", _optional(status.skipped_late_last)),
            ("execution.chunks_without_action_in_bound", str(status.no_action_left)),
            ("execution.starved_ticks", str(status.starved_ticks)),
            ("execution.too_old_ticks", str(status.too_old_ticks)),
            ("execution.queue_length", str(status.queue_length)),
            ("execution.clipped.position", str(c.position)), ("execution.clipped.velocity", str(c.velocity)),
            ("execution.clipped.acceleration", str(c.acceleration)),
            ("execution.clipped.commands", str(c.clipped_commands)),
            ("execution.clipped_recent_fraction", f"{status.clipped_recent_fraction:.3f}"),
        ]
        values += _stat_values("execution.obs_age_at_inference_start_ms", status.obs_age_at_start_ms,
                               status.last.get("obs_age_at_start_ms"))
        values += _stat_values("execution.inference_latency_ms", status.latency_ms, status.last.get("latency_ms"))
        values += _stat_values("execution.obs_age_at_publish_ms", status.obs_age_at_publish_ms,
                               status.last.get("obs_age_at_publish_ms"))
    if commands.loop is not None:
        lateness = commands.loop.lateness_ms
        values += [("control.ticks", str(commands.loop.ticks)), ("control.missed_ticks", str(commands.loop.missed))]
        values += [(f"control.jitter_ms.{stat}", f"{lateness[stat]:.3f}" if stat in lateness else "n/a")
                   for stat in ("p50", "p99", "max")]
    return values


def build_array(status: DiagnosticStatus, stamp: object) -> DiagnosticArray:
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = [status]
    return array


def _running_text(worker: WorkerStatus, runtime: RuntimeSettings, rate_mode: str, device: str) -> str:
    """The message while nothing is wrong: the measured rate against the target, once there is one."""
    if worker.phase is Phase.UNCONFIGURED:
        return "unconfigured: no model loaded (configure loads it)"
    if worker.phase is Phase.INACTIVE:
        return "inactive: model loaded, not inferring or commanding (activate starts it)"
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

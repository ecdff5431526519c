"""The /diagnostics status built from worker and input snapshots: levels, messages, keys."""

from __future__ import annotations

import dataclasses
import time

from pi05_ros.ros.diagnostics import DEMO_BANNER, ModelFacts, build_status, gather_problems
from pi05_ros.ros.inputs import InputState
from pi05_ros.ros.monitor import rate_text
from pi05_ros.ros.problems import Level, Problem, ProblemCode
from pi05_ros.ros.settings import RuntimeSettings
from pi05_ros.ros.worker import Phase, PromptFacts, WorkerStatus, prompt_truncated_problem

STAGES = ("preprocess", "vision", "total")
RUNTIME = RuntimeSettings(denoise_steps=10, rate_hz=10.0, default_instruction="", publish_joint_trajectory=True)
MODEL = ModelFacts("Pi0.5 [pi05] from /ckpt", "cuda:0", "bf16", False, STAGES)
RUNNING = WorkerStatus(
    phase=Phase.RUNNING, fatal_error=None, problems=(), inferences=50, published=50, skipped={"stale_input": 2},
    overruns=0, errors=0, achieved_rate_hz=10.0, steady_for_s=5.0, last_latency_ms=42.0, last_denoise_steps=10,
    stage_stats={s: {"mean": 1.0, "std": 0.1, "p50": 1.0, "p99": 2.0} for s in STAGES},
    gpu_memory={"allocated": 1024.0, "reserved": 2048.0, "peak": 1500.0},
)
INPUTS = [InputState("base_image", 100, 0.02, None, 3), InputState("joint_states", 300, 0.01, None, 0),
          InputState("instruction", 1, 12.0, None, 0)]


def build(worker: WorkerStatus = RUNNING, model: ModelFacts | None = MODEL, inputs_override=None, **kwargs):
    options = {"rate_mode": "timer", "demo_requested": False, **kwargs}
    inputs = INPUTS if inputs_override is None else inputs_override
    status = build_status("/ns/pi05_policy: policy", worker, inputs, RUNTIME, model, **options)
    return status, {kv.key: kv.value for kv in status.values}


def test_ok_status_carries_stages_inputs_and_gpu_memory() -> None:
    status, values = build()
    assert status.level == bytes([Level.OK]) and status.message == "running at 10.0 / 10 Hz target"
    for stage in STAGES:
        assert values[f"stage.{stage}.p99_ms"] == "2.000"
    assert values["input.base_image.age_s"] == "0.020" and values["dropped_observations"] == "3"
    assert values["gpu_memory.allocated_mib"] == "1024.0" and values["skipped.stale_input"] == "2"
    assert values["demo_model"] == "false" and status.hardware_id == "cuda:0"


def test_low_rate_warns_only_after_a_full_steady_window() -> None:
    slow = dataclasses.replace(RUNNING, achieved_rate_hz=6.0)
    status, _ = build(slow)
    assert status.level == bytes([Level.WARN]) and "rate 6.0 Hz is below rate_hz 10" in status.message
    assert "inference takes 1 ms (p50)" in status.message
    just_resumed = dataclasses.replace(slow, steady_for_s=1.0)
    assert build(just_resumed)[0].level == bytes([Level.OK])
    assert build(slow, rate_mode="trigger:front")[0].level == bytes([Level.OK])  # no target in trigger mode


def test_problems_set_level_and_message() -> None:
    stale = dataclasses.replace(RUNNING, problems=(Problem(Level.WARN, ProblemCode.STALE_INPUT,
                                                           "'base_image' is stale"),))
    assert build(stale)[0].level == bytes([Level.WARN])
    bad = dataclasses.replace(RUNNING, problems=(Problem(Level.WARN, ProblemCode.NO_INSTRUCTION, "no instruction yet"),
                                                 Problem(Level.ERROR, ProblemCode.BAD_INPUT, "bad input: NaN")))
    status, values = build(bad)
    assert status.level == bytes([Level.ERROR]) and status.message == "no instruction yet; bad input: NaN"
    assert values["problem_count"] == "2" and build(stale)[1]["problem_count"] == "1"
    assert build(RUNNING)[1]["problem_count"] == "0"


def test_loading_warns_and_failure_is_an_error() -> None:
    loading = dataclasses.replace(RUNNING, phase=Phase.LOADING, stage_stats={}, gpu_memory={})
    status, values = build(loading, model=None)
    assert status.level == bytes([Level.WARN]) and "loading model, no actions yet" in status.message
    assert values["model"] == "loading" and values["gpu_memory"].startswith("n/a")
    failed = dataclasses.replace(loading, phase=Phase.FAILED, fatal_error="checkpoint /x does not exist")
    status, _ = build(failed, model=None)
    assert status.level == bytes([Level.ERROR]) and "checkpoint /x does not exist" in status.message


def test_demo_model_is_announced_even_before_it_loads() -> None:
    loading = dataclasses.replace(RUNNING, phase=Phase.LOADING)
    status, values = build(loading, model=None, demo_requested=True)
    assert status.message.startswith(DEMO_BANNER) and values["demo_model"] == "true"
    demo = dataclasses.replace(MODEL, is_demo=True)
    assert build(model=demo)[0].message.startswith(DEMO_BANNER)


def test_rate_is_shown_against_its_target_once_measured() -> None:
    first = dataclasses.replace(RUNNING, published=0, inferences=0, achieved_rate_hz=0.0, steady_for_s=0.0)
    status, values = build(first)
    assert status.message == "running, waiting for the first inference" and "0.0 Hz" not in status.message
    assert rate_text(values) == "waiting"
    ramping = dataclasses.replace(RUNNING, achieved_rate_hz=3.3, steady_for_s=1.0)  # window not full yet
    status, values = build(ramping)
    assert status.message == "running, measuring the rate against the 10 Hz target"
    assert values["rate_measured"] == "false" and rate_text(values) == "measuring (10 Hz target)"
    status, values = build(dataclasses.replace(RUNNING, achieved_rate_hz=9.8))
    assert status.message == "running at 9.8 / 10 Hz target" and rate_text(values) == "9.8 / 10 Hz"
    status, values = build(RUNNING, rate_mode="trigger:front")
    assert status.message == "running at 10.0 Hz, one inference per front frame" and rate_text(values) == "10.0 Hz"


def test_a_target_beyond_the_device_is_named() -> None:
    slow_stats = {s: {"mean": 140.0, "std": 1.0, "p50": 140.0, "p99": 150.0} for s in STAGES}
    cpu = dataclasses.replace(MODEL, device="cpu")
    starting = dataclasses.replace(RUNNING, achieved_rate_hz=2.0, steady_for_s=1.0, stage_stats=slow_stats)
    status, _ = build(starting, model=cpu)
    assert status.level == bytes([Level.OK])
    assert "rate_hz 10 is more than this cpu allows (at most ~7.1 Hz)" in status.message
    measured = dataclasses.replace(starting, achieved_rate_hz=7.0, steady_for_s=5.0)
    status, _ = build(measured, model=cpu)
    assert status.level == bytes([Level.WARN]) and "rate 7.0 Hz is below rate_hz 10" in status.message
    assert "more than this cpu allows" in status.message
    assert "allows" not in build()[0].message  # 1 ms per inference: 10 Hz is well within reach


def test_a_refused_input_is_named_even_when_no_tick_looked_at_it() -> None:
    inputs = [InputState("base_image", 5, None, "frame is 1x1, smaller than 16 px on a side", 0), *INPUTS[1:]]
    inactive = dataclasses.replace(RUNNING, phase=Phase.INACTIVE)
    problems = gather_problems(inactive, inputs, RUNTIME, MODEL, rate_mode="timer")
    assert [(p.level, p.code, p.subject) for p in problems] == [(Level.ERROR, ProblemCode.BAD_INPUT, "base_image")]
    # The same problem from the worker's tick is not repeated.
    ticked = dataclasses.replace(RUNNING, problems=(Problem(Level.ERROR, ProblemCode.BAD_INPUT, "'base_image': x",
                                                            "base_image"),))
    assert len(gather_problems(ticked, inputs, RUNTIME, MODEL, rate_mode="timer")) == 1


def test_a_prompt_cut_to_the_token_limit_warns_while_chunks_come() -> None:
    facts = PromptFacts("put the cup " * 40, tokens=48, max_tokens=48, full_tokens=130)
    truncated = dataclasses.replace(RUNNING, prompt=facts, notices=(prompt_truncated_problem(facts),))
    status, values = build(truncated)
    assert status.level == bytes([Level.WARN]) and values["problem_count"] == "1"
    assert "130 tokens with the state, more than this model's max_token_len 48" in status.message
    assert "shorten the instruction" in status.message
    assert (values["prompt.tokens"], values["prompt.max_tokens"], values["prompt.truncated"]) == ("48", "48", "true")
    assert len(values["prompt.text"]) <= 200
    fits = dataclasses.replace(RUNNING, prompt=PromptFacts("wipe", 12, 48, 12))
    status, values = build(fits)
    assert status.level == bytes([Level.OK]) and values["prompt.truncated"] == "false"
    assert build()[1]["prompt.truncated"] == "n/a"  # before the first chunk


def test_long_problem_messages_are_shortened_in_the_status() -> None:
    names = ", ".join(f"joint_{i}" for i in range(10_000))
    inputs = [InputState("joint_states", 1, None, f"lacks joint(s) x; it has [{names}]", 0)]
    status, values = build(dataclasses.replace(RUNNING, phase=Phase.INACTIVE), inputs_override=inputs)
    assert len(status.message) < 1100 and "characters)" in status.message
    assert len(values["input.joint_states.error"]) == 1000


def test_a_quiet_trigger_camera_is_named_and_a_hold_for_a_named_problem_only_once() -> None:
    """Trigger mode: no frame, no tick; the inputs' own problems are passed in and named once."""
    stale = Problem(Level.WARN, ProblemCode.STALE_INPUT, "'front' is stale: newest message is 5.05 s old", "front")
    problems = gather_problems(RUNNING, INPUTS, RUNTIME, MODEL, rate_mode="trigger:front", input_problems=(stale,))
    assert [p.code for p in problems] == [ProblemCode.STALE_INPUT]
    ticked = dataclasses.replace(RUNNING, problems=(dataclasses.replace(stale, message="'front' is stale: 0.61"),))
    again = gather_problems(ticked, INPUTS, RUNTIME, MODEL, rate_mode="trigger:front", input_problems=(stale,))
    assert [p.message for p in again] == [stale.message]  # named once, with the age of now


def test_a_hold_for_a_problem_already_named_with_another_age_is_not_repeated() -> None:
    from pi05_ros.execution.commander import ChunkCommander
    from pi05_ros.execution.limits import JointLimits
    from pi05_ros.ros.diagnostics import CommandFacts

    commander = ChunkCommander(("a",), 50_000_000, max_input_age_ns=500_000_000, on_stale="hold",
                               limits=JointLimits.none(("a",)), command_margin_ns=10_000_000)
    commander._set_state("holding", "'front' is stale: newest message is 0.71 s old > max_input_age_s 0.5")
    worker = dataclasses.replace(RUNNING, problems=(Problem(
        Level.WARN, ProblemCode.STALE_INPUT, "'front' is stale: newest message is 0.62 s old > max_input_age_s 0.5",
        "front"),))
    facts = CommandFacts("active", commander.status(), None)
    problems = gather_problems(worker, INPUTS, RUNTIME, MODEL, rate_mode="timer", commands=facts)
    assert [p.code for p in problems] == [ProblemCode.STALE_INPUT]
    commander._set_state("holding", "no queued command (chunks come slower than they run out)")
    problems = gather_problems(worker, INPUTS, RUNTIME, MODEL, rate_mode="timer",
                               commands=CommandFacts("active", commander.status(), None))
    assert [p.code for p in problems] == [ProblemCode.STALE_INPUT, ProblemCode.HOLDING]


def test_a_pause_forgets_the_last_ticks_problems_and_measures_the_rate_again() -> None:
    import time

    from pi05_ros.ros.worker import WorkerCounters

    counters = WorkerCounters()
    counters.set_phase(Phase.RUNNING)
    now = time.monotonic()
    for k in range(40):  # 4 s of steady publishing at 10 Hz: measured
        counters.published_chunk(now - 4.0 + 0.1 * k, 0.05, 10)
    assert counters.snapshot().rate_measured
    counters.failed_inference(Problem(Level.ERROR, ProblemCode.INFERENCE_FAILED, "inference failed: x"))
    counters.paused()  # deactivated
    snapshot = counters.snapshot()
    assert snapshot.problems == () and not snapshot.rate_measured
    counters.published_chunk(time.monotonic(), 0.05, 10)  # reactivated: a new window starts
    assert not counters.snapshot().rate_measured


def test_a_report_names_a_failure_between_successes_once() -> None:
    """Every other inference failing, a report that falls after a success still names the failure since the last
    report (before, a 1 Hz report in step with a 10 Hz loop could show OK for ever); the report after a clean
    period does not, and a plain snapshot (what the node's other readers take) shows the last attempt only."""
    from pi05_ros.ros.observation import bad_input_problem
    from pi05_ros.ros.worker import WorkerCounters

    counters = WorkerCounters()
    counters.set_phase(Phase.RUNNING)
    failure = Problem(Level.ERROR, ProblemCode.INFERENCE_FAILED, "inference failed: RuntimeError: x", "RuntimeError")
    for _ in range(3):  # a report period: fail, succeed, fail, succeed
        counters.failed_inference(failure)
        counters.published_chunk(time.monotonic(), 0.05, 10)
    assert counters.snapshot().problems == ()  # the last attempt succeeded
    assert counters.snapshot(report=True).problems == (failure,)
    counters.published_chunk(time.monotonic(), 0.05, 10)  # a clean period
    assert counters.snapshot(report=True).problems == ()
    counters.failed_inference(failure)  # the last attempt failed: named once, not twice
    assert counters.snapshot(report=True).problems == (failure,)
    # a failure, then a tick skipped for a bad camera frame (a failure code of its own): both are named
    counters.failed_inference(failure)
    frame = bad_input_problem("front/image", "front", "unsupported encoding 'yuv422'")
    counters.skipped_tick((frame,))
    assert set(counters.snapshot(report=True).problems) == {failure, frame}
    counters.failed_inference(failure)
    counters.paused()  # a deactivation forgets it
    assert counters.snapshot(report=True).problems == ()


def test_an_inference_that_ends_after_a_deactivation_leaves_the_pause_clean() -> None:
    """The executor thread deactivates while the inference thread is inside an inference: what that inference
    ends with (a failure, a chunk) must not bring back a problem or start the rate window of the paused node."""
    import threading
    import time

    import numpy as np

    from pi05_ros.engine.runner import ActionChunk
    from pi05_ros.ros.inputs import InputBuffers
    from pi05_ros.ros.settings import CameraConfig
    from pi05_ros.ros.worker import InferenceWorker

    inside = threading.Event()

    class SlowPolicy:
        state_dim, device, config = 7, "cpu", None
        fail = False

        def infer(self, images, state, prompt, steps, **kwargs):  # noqa: ANN001, ANN201
            inside.set()
            time.sleep(0.3)
            if self.fail:
                raise RuntimeError("cuda error")
            return ActionChunk(np.zeros((10, 7), np.float32), steps)

    cameras = (CameraConfig("base_image", "base_0_rgb", "raw"),)
    inputs = InputBuffers([c.name for c in cameras])
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            frame = inputs.cameras["base_image"].spare((8, 8, 3))
            frame[...] = 0
            inputs.cameras["base_image"].commit(frame, time.time_ns())
            joints = inputs.joints.spare((7,))
            joints[...] = 0
            inputs.joints.commit(joints, time.time_ns())
            time.sleep(0.01)

    threading.Thread(target=feed, daemon=True).start()
    inputs.instruction.set("pick")
    settings = RuntimeSettings(denoise_steps=2, rate_hz=3.0, default_instruction="", publish_joint_trajectory=True)
    try:
        for fail in (True, False):
            policy = SlowPolicy()
            policy.fail = fail
            worker = InferenceWorker(lambda p=policy: p, inputs, cameras, lambda: settings, lambda *a: None,
                                     max_input_age_s=5.0)
            worker.set_active(True)
            worker.start()
            assert worker.ready.wait(10)
            inside.clear()
            assert inside.wait(5)
            published = worker.status().published  # the inference in flight sleeps 0.3 s more
            worker.set_active(False)  # mid-inference
            time.sleep(0.6)  # the inference has ended
            status = worker.status()
            assert status.problems == () and status.published == published and status.steady_for_s == 0.0, status
            assert worker.report_status().problems == ()  # nor a failure kept for the next report
            worker.stop(1.0)
    finally:
        stop.set()


def test_an_unconfigured_node_shows_no_model_rather_than_loading() -> None:
    _, values = build(WorkerStatus.without_worker(), model=None)
    assert values["model"] == "none (unconfigured)" and values["device"] == "?"
    loading = dataclasses.replace(WorkerStatus.without_worker(), phase=Phase.LOADING)
    assert build(loading, model=None)[1]["model"] == "loading"


def test_a_refused_input_is_named_once_as_its_callback_named_it() -> None:
    """A compressed camera's callback names its topic ('front/compressed'); the diagnostics timer passes the same
    problem in, so the generic one by input name is not added beside it (the log had two lines for one frame)."""
    from pi05_ros.ros.observation import bad_input_problem

    refused = bad_input_problem("front/compressed", "front", "not a JPEG or PNG")
    inputs = [InputState("front", 3, 0.02, "not a JPEG or PNG", 0)]
    idle = WorkerStatus.without_worker()
    problems = gather_problems(idle, inputs, RUNTIME, None, rate_mode="timer", input_problems=(refused,))
    assert [p.message for p in problems] == ["'front/compressed': not a JPEG or PNG"]

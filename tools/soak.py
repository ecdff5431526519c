#!/usr/bin/env python3
"""A long run of the installed policy node over real DDS (issue 11): memory, latency over time, chunks lost,
overruns; optionally with faults injected on a schedule. Not part of CI's default run.

    source scripts/env.sh
    python tools/soak.py --inferences 10000                          # CPU: the tiny demo model (about 17 min)
    python tools/soak.py --inferences 10000 --faults                 # the same with the fault schedule below
    python tools/soak.py --gpu --inferences 100000 --rate 50          # GPU: full-size demo model, fp8
    python tools/soak.py --gpu --inferences 100000 --rate 100 --steps 1   # the same in 27 min (benchmarks §36)

The node runs in chunk mode and commands (allow_demo_commands), fed 640x480 frames on two cameras and joint states
by an in-process peer (20 Hz on the CPU, 50 Hz with --gpu). Measured:
- RSS of the node process (VmRSS, every 5 s): start (after the first 2 % of inferences), end, and the slope of a
  least-squares line through the samples after that start, in MiB per hour; the same for RssAnon (the process's
  own memory, what a leak grows) beside RssShmem (the pages of peers' DDS shared-memory segments it has read, which
  grow up to those segments' size); GPU memory from /diagnostics (gpu_memory.*) on a GPU;
- per window of `--window` inferences: p50 / p99 / max of ActionChunk.inference_latency;
- chunks lost: gaps in ActionChunk.sequence as received (reliable QoS: a gap is a chunk that never arrived);
- overruns, failed inferences and skipped ticks from the last /diagnostics.
--faults (the fault node, test/ros/fault_node.py) cycles every 60 s through: the wrist camera stops for 3 s,
a GPU error raised in the runner for 2 s, joint states at 1 kHz for 5 s, 20 parameter sets, a latched instruction
from a publisher that restarts twice, 50 instructions at 10 Hz; besides, every 10 s the instruction changes.
For each fault it records the time from its end to the next chunk, what /diagnostics said meanwhile (its worst
level and the distinct messages) and how the node's counters moved (failed inferences, holds, skipped ticks,
overruns, instructions taken) from just before the fault to 3 s after it. A Markdown summary is printed and,
with --out, written with the raw samples as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "ros"))

from ros_harness import (  # noqa: E402
    JOINTS,
    NODE_START_TIMEOUT_S,
    Driver,
    NodeProcess,
    installed_params_file,
    make_image,
    publish_large_frames,
    status_level,
    status_values,
    unique_namespace,
)

FAULT_NODE = REPO / "test" / "ros" / "fault_node.py"
DEMO_PREFIX = "DEMO MODEL (random weights, actions are meaningless): "


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and its parts (kernel >= 4.5): RssAnon (the process's own memory: what a leak grows), RssFile (mapped
    files: libraries) and RssShmem (shared memory pages it touched: the DDS segments of the peers it reads from)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            values[key] = int(line.split()[1]) / 1024.0
    return values


@dataclass
class Record:
    """What the soak saw; the chunk callback and the sampler write it."""

    latencies: list[float] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    rss: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)  # (time, chunks so far, MiB)
    gpu: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_chunk(self, when: float, chunk: Any) -> None:
        with self.lock:
            self.latencies.append(float(chunk.inference_latency))
            self.sequences.append(int(chunk.sequence))
            self.arrivals.append(when)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.sequences)

    def first_chunk_after(self, t: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                later = [a for a in self.arrivals[-200:] if a > t]
            if later:
                return later[0] - t
            time.sleep(0.02)
        return None


def restamped(template: Any, stamp: int) -> Any:
    template.header.stamp.sec, template.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    return template


def distinct_messages(messages: Iterable[str], width: int = 160) -> list[str]:
    """/diagnostics messages without the demo model's prefix, one per wording apart from its numbers (a stale
    input's growing age is one message), each cut to `width` characters."""
    kept: dict[str, str] = {}
    for message in messages:
        if message.startswith(DEMO_PREFIX):
            message = message[len(DEMO_PREFIX):]
        kept.setdefault(re.sub(r"[0-9.]+", "#", message), message[:width])
    return list(kept.values())


class FaultSchedule(threading.Thread):
    """Injects the faults of the module docstring, one every `period_s`, and records each recovery."""

    KINDS = ("camera_stops", "gpu_error", "joint_states_1khz", "parameter_sets", "publisher_restarts",
             "instructions_10hz")
    COUNTERS = ("failed_inferences", "execution.holds", "skipped_ticks", "overruns", "input.instruction.messages")

    def __init__(self, driver: Driver, record: Record, fault_file: Path, period_s: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.driver, self.record, self.fault_file, self.period = driver, record, fault_file, period_s
        self.stop = threading.Event()

    def counters(self) -> dict[str, int]:
        statuses = self.driver.statuses_since(time.monotonic() - 3.0)
        values = status_values(statuses[-1]) if statuses else {}
        return {k: int(float(values[k])) for k in self.COUNTERS if k in values}

    def run(self) -> None:
        step = 0
        next_fault = time.monotonic() + self.period / 2
        next_instruction = time.monotonic() + 10.0
        last_instruction = 0.0
        while not self.stop.wait(0.2):
            now = time.monotonic()
            if now >= next_instruction:
                self.driver.say(f"stack the blocks, round {step}")
                next_instruction, last_instruction = now + 10.0, now
            if now < next_fault or now - last_instruction < 2.0:  # the counters before a fault include that one
                continue
            kind = self.KINDS[step % len(self.KINDS)]
            step += 1
            before = self.counters()
            started = time.monotonic()
            detail = getattr(self, kind)()
            ended = time.monotonic()
            resumed = self.record.first_chunk_after(ended, 30.0)
            time.sleep(max(0.0, ended + 3.0 - time.monotonic()))  # a status (1 Hz) that counts the whole fault
            after = self.counters()
            seen = self.driver.statuses_since(started - 0.5)
            worst = max((status_level(x) for x in seen), default=None)
            messages = distinct_messages(x.message for x in seen if status_level(x) > 0)
            moved = {k: after[k] - before[k] for k in after if k in before and after[k] != before[k]}
            self.record.faults.append({"kind": kind, "at_chunk": self.record.count, "lasted_s": ended - started,
                                       "next_chunk_after_s": resumed, "worst_level": worst, "messages": messages,
                                       "counters_moved": moved, **detail})
            print(f"fault {kind}: lasted {ended - started:.1f} s, next chunk "
                  f"{'never (30 s)' if resumed is None else f'{resumed:.2f} s'} after its end, worst level {worst}, "
                  f"counters {moved} {detail}", flush=True)
            for message in messages[:4]:
                print(f"    reported: {message}", flush=True)
            next_fault = time.monotonic() + self.period

    def camera_stops(self) -> dict[str, Any]:
        self.driver.paused_cameras.add("wrist_image")
        time.sleep(3.0)
        self.driver.paused_cameras.clear()
        return {}

    def gpu_error(self) -> dict[str, Any]:
        self.fault_file.touch()
        time.sleep(2.0)
        self.fault_file.unlink(missing_ok=True)
        return {}

    def joint_states_1khz(self) -> dict[str, Any]:
        sent, end = 0, time.monotonic() + 5.0
        next_at = time.monotonic()
        while time.monotonic() < end:
            self.driver.joint_pub.publish(Driver.good_joints(time.time_ns()))
            sent += 1
            next_at += 0.001
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return {"published_hz": round(sent / 5.0)}

    def parameter_sets(self) -> dict[str, Any]:
        replies = []
        for i in range(20):
            start = time.monotonic()
            result = self.driver.set_parameter("denoise_steps", 8 if i % 2 == 0 else 10, timeout=10.0)
            assert result.successful
            replies.append(time.monotonic() - start)
        return {"reply_max_ms": round(1e3 * max(replies), 1)}

    def publisher_restarts(self) -> dict[str, Any]:
        import rclpy
        from rclpy.context import Context
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for text in ("wipe the table", "open the drawer"):  # a publisher that goes away and comes back
            context = Context()
            rclpy.init(context=context)
            node = rclpy.create_node(f"soak_pub_{uuid.uuid4().hex[:6]}", namespace=self.driver.namespace,
                                     context=context)
            node.create_publisher(String, "instruction", latched).publish(String(data=text))
            time.sleep(2.0)
            node.destroy_node()
            rclpy.try_shutdown(context=context)
        return {"last_text": "open the drawer", "taken": self.prompt_becomes("open the drawer")}

    def instructions_10hz(self) -> dict[str, Any]:
        for i in range(50):
            self.driver.say(f"task number {i} of 50")
            time.sleep(0.1)
        return {"sent": 50, "last_used": self.prompt_becomes("task number 49 of 50")}

    def prompt_becomes(self, text: str, timeout: float = 10.0) -> bool:
        """Whether a /diagnostics status names `text` as the last chunk's prompt within `timeout`."""
        since = time.monotonic() - 1.0
        return self.driver.wait_for_status(since, timeout, lambda x: status_values(x).get("prompt.text") == text) \
            is not None


def summarize(record: Record, statuses: list[Any], warm: int, window: int, started: float,
              ended: float) -> tuple[str, dict[str, Any]]:
    latencies = np.array(record.latencies) * 1e3
    sequences = np.array(record.sequences)
    gaps = np.diff(sequences) - 1 if len(sequences) > 1 else np.array([])
    lost = int(gaps[gaps > 0].sum()) if gaps.size else 0
    out_of_order = int((gaps < 0).sum()) if gaps.size else 0
    samples = [(t, n, mem) for t, n, mem in record.rss if n >= warm]
    hours = np.array([(t - samples[0][0]) / 3600.0 for t, _, _ in samples]) if samples else np.array([])

    def series(key: str) -> np.ndarray:
        return np.array([mem.get(key, np.nan) for _, _, mem in samples])

    def slope_of(values: np.ndarray) -> float:
        return float(np.polyfit(hours, values, 1)[0]) if len(values) >= 3 else float("nan")

    mib, anon, shmem = series("VmRSS"), series("RssAnon"), series("RssShmem")
    slope, anon_slope = slope_of(mib), slope_of(anon)
    last = status_values(statuses[-1]) if statuses else {}
    gpu_samples = [(t, values) for t, n, values in record.gpu if n >= warm]
    gpu_text = ""
    if len(gpu_samples) >= 3:
        gpu_hours = np.array([(t - gpu_samples[0][0]) / 3600.0 for t, _ in gpu_samples])
        parts = []
        for key in ("gpu_memory.allocated_mib", "gpu_memory.reserved_mib"):
            gpu_mib = np.array([values.get(key, np.nan) for _, values in gpu_samples])
            parts.append(f"{key.split('.')[1]} {gpu_mib[0]:.1f} -> {gpu_mib[-1]:.1f} MiB "
                         f"({float(np.polyfit(gpu_hours, gpu_mib, 1)[0]):+.2f} MiB/h)")
        gpu_text = "GPU memory after warm-up: " + ", ".join(parts)
    lines = ["| inferences | p50 ms | p99 ms | max ms |", "|---|---|---|---|"]
    windows = []
    for start in range(0, len(latencies), window):
        part = latencies[start:start + window]
        row = (start + 1, start + len(part), float(np.percentile(part, 50)), float(np.percentile(part, 99)),
               float(part.max()))
        windows.append(row)
        lines.append(f"| {row[0]}-{row[1]} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.1f} |")
    if record.faults:
        levels = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE", None: "-"}
        lines += ["", "| fault | at chunk | lasted s | next chunk after its end s | worst /diagnostics level | "
                      "counters moved (to 3 s after) | detail |", "|---|---|---|---|---|---|---|"]
        for fault in record.faults:
            detail = {k: v for k, v in fault.items() if k not in (
                "kind", "at_chunk", "lasted_s", "next_chunk_after_s", "worst_level", "messages", "counters_moved")}
            resumed = fault["next_chunk_after_s"]
            lines.append(f"| {fault['kind']} | {fault['at_chunk']} | {fault['lasted_s']:.1f} | "
                         f"{'none in 30 s' if resumed is None else f'{resumed:.2f}'} | "
                         f"{levels.get(fault['worst_level'], fault['worst_level'])} | "
                         f"{', '.join(f'{k} {v:+d}' for k, v in fault['counters_moved'].items()) or '-'} | "
                         f"{', '.join(f'{k} {v}' for k, v in detail.items()) or '-'} |")
    facts = {
        "chunks_received": int(len(sequences)), "sequence_first": int(sequences[0]) if len(sequences) else None,
        "sequence_last": int(sequences[-1]) if len(sequences) else None, "chunks_lost": lost,
        "out_of_order": out_of_order, "duration_s": ended - started,
        "rss_start_mib": float(mib[0]) if len(mib) else None, "rss_end_mib": float(mib[-1]) if len(mib) else None,
        "rss_max_mib": float(mib.max()) if len(mib) else None, "rss_slope_mib_per_h": slope,
        "rss_anon_start_mib": float(anon[0]) if len(anon) else None,
        "rss_anon_end_mib": float(anon[-1]) if len(anon) else None, "rss_anon_slope_mib_per_h": anon_slope,
        "rss_shmem_start_mib": float(shmem[0]) if len(shmem) else None,
        "rss_shmem_end_mib": float(shmem[-1]) if len(shmem) else None,
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
                       "max": float(latencies.max())},
        "windows": windows,
        "diagnostics": {k: last.get(k) for k in ("inferences", "published_chunks", "overruns", "failed_inferences",
                                                 "skipped_ticks", "dropped_observations", "execution.chunks",
                                                 "execution.holds", "control.missed_ticks", "control.jitter_ms.p99",
                                                 "gpu_memory.allocated_mib", "gpu_memory.reserved_mib",
                                                 "gpu_memory.peak_mib")},
        "skipped": {k: v for k, v in last.items() if k.startswith("skipped.")},
        # where an inference's time goes (the node's per-stage p50 / p99), to compare with pi05-bench's stages
        "stages": {k: v for k, v in last.items() if k.startswith("stage.") and not k.endswith("mean_ms")},
        # resizing each camera's frames as they arrive (prepare_views), mean ms per frame
        "prepare_ms": {k[len("input."):-len(".prepare_ms")]: v for k, v in last.items() if k.endswith(".prepare_ms")},
        "gpu": record.gpu[:1] + record.gpu[-1:], "faults": record.faults,
    }
    text = "\n".join([
        f"chunks received {len(sequences)} (sequence {facts['sequence_first']}..{facts['sequence_last']}), "
        f"lost {lost}, out of order {out_of_order}, in {facts['duration_s'] / 60:.1f} min",
        f"RSS after {warm} inferences {facts['rss_start_mib']:.1f} MiB, end {facts['rss_end_mib']:.1f} MiB, max "
        f"{facts['rss_max_mib']:.1f} MiB, slope {slope:+.2f} MiB/h ({len(samples)} samples); of it RssAnon "
        f"{facts['rss_anon_start_mib']:.1f} -> {facts['rss_anon_end_mib']:.1f} MiB ({anon_slope:+.2f} MiB/h), "
        f"RssShmem (peers' DDS segments) {facts['rss_shmem_start_mib']:.1f} -> {facts['rss_shmem_end_mib']:.1f} MiB",
        *([gpu_text] if gpu_text else []),
        f"latency p50 {facts['latency_ms']['p50']:.1f} ms, p99 {facts['latency_ms']['p99']:.1f} ms, max "
        f"{facts['latency_ms']['max']:.1f} ms",
        "diagnostics at the end: " + ", ".join(f"{k} {v}" for k, v in facts["diagnostics"].items() if v is not None)
        + (", " + ", ".join(f"{k} {v}" for k, v in facts["skipped"].items()) if facts["skipped"] else ""),
        *(["stages at the end (ms): " + ", ".join(f"{k[len('stage.'):]} {v}" for k, v in facts["stages"].items())]
          if facts["stages"] else []),
        *(["frames resized on arrival (ms per frame): " + ", ".join(f"{k} {v}" for k, v in facts["prepare_ms"].items())]
          if facts["prepare_ms"] else []),
        "", *lines,
    ])
    return text, facts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inferences", type=int, default=10_000, help="chunks to receive")
    parser.add_argument("--gpu", action="store_true", help="device cuda, precision fp8, full-size demo model")
    parser.add_argument("--rate", type=float, default=None, help="rate_hz (default 10; 50 with --gpu)")
    parser.add_argument("--steps", type=int, default=10, help="denoise_steps")
    parser.add_argument("--faults", action="store_true", help="inject the fault schedule")
    parser.add_argument("--fault-period", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--window", type=int, default=None, help="inferences per latency row (default N/10)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary (.md) and samples (.json) here")
    parser.add_argument("--partial-every", type=float, default=300.0,
                        help="seconds between interim summaries (<out>.partial.md) while it runs")
    parser.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="one more node parameter, e.g. prepare_views:=on_arrival (repeatable)")
    args = parser.parse_args()
    rate = args.rate or (50.0 if args.gpu else 10.0)
    window = args.window or max(1, args.inferences // 10)
    warm = max(1, args.inferences // 50)

    # The peer publishes 640x480 frames: with Fast DDS's 512 KB default segment about half would be lost in the
    # publisher (docs/benchmarks.md §31), which would measure the transport, not the node. Only the peer gets this
    # profile: the node starts with its own (config/fastdds_profile.xml), as users run it.
    profile = publish_large_frames()
    record = Record()
    namespace = unique_namespace("pi05_soak")
    driver = Driver(namespace, feed_period_s=0.02 if args.gpu else 0.05, on_chunk=record.on_chunk)
    for name in driver.image_pubs:
        frame = make_image(480, 640, "rgb8")
        driver.image_factory[name] = lambda stamp, m=frame: restamped(m, stamp)
    driver.say("stack the blocks")
    device = ("-p", "device:=cuda", "-p", "precision:=fp8") if args.gpu else ("-p", "device:=cpu", "-p",
                                                                             "cpu_threads:=1")
    fault_file = Path(f"/tmp/pi05_soak_fault_{uuid.uuid4().hex[:8]}")
    executable: str | Path = FAULT_NODE if args.faults else "policy_node"
    node = NodeProcess(executable, namespace, "-p", f"state_joint_names:=[{', '.join(JOINTS)}]",
                       "-p", f"rate_hz:={rate}", "-p", f"denoise_steps:={args.steps}", "-p", "warmup:=2",
                       "-p", "allow_demo_commands:=true", *device,
                       *(arg for param in args.param for arg in ("-p", param)), params_file=installed_params_file(),
                       env={"PI05_FAULT_FILE": str(fault_file)})
    pid = node.process.pid
    # PI05_GIT_COMMIT names the commit of a copied tree whose .git is stale (the GPU machine), as for pi05-bench.
    commit = os.environ.get("PI05_GIT_COMMIT") or subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    schedule: FaultSchedule | None = None
    try:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S * (4 if args.gpu else 1)  # a GPU start compiles
        while record.count == 0:
            if time.monotonic() > deadline or not node.alive():
                print(node.output()[-3000:])
                return 1
            time.sleep(0.1)
        started = time.monotonic()
        if args.faults:
            schedule = FaultSchedule(driver, record, fault_file, args.fault_period)
            schedule.start()
        next_report = started + 60.0
        next_partial = started + args.partial_every
        while record.count < args.inferences:
            if not node.alive():
                print(node.output()[-3000:])
                return 1
            time.sleep(5.0)
            now = time.monotonic()
            record.rss.append((now, record.count, memory_mib(pid)))
            statuses = driver.statuses_since(now - 5.0)
            if statuses:
                values = status_values(statuses[-1])
                gpu = {k: float(v) for k, v in values.items() if k.startswith("gpu_memory.") and k.endswith("_mib")}
                if gpu:
                    record.gpu.append((now, record.count, gpu))
            if args.out is not None and now >= next_partial:
                # A run cut short (a GPU machine taken back at its time limit) still leaves its figures so far.
                next_partial = now + args.partial_every
                try:
                    text, _ = summarize(record, driver.statuses_since(0.0), warm, window, started, now)
                except (ValueError, IndexError, TypeError, np.linalg.LinAlgError):  # too few samples yet
                    text = None
                if text is not None:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.with_suffix(".partial.md").write_text(
                        f"PARTIAL: {record.count} of {args.inferences} chunks, {(now - started) / 60:.1f} min\n\n"
                        f"{text}\n")
            if now >= next_report:
                next_report = now + 60.0
                mem = record.rss[-1][2]
                print(f"{(now - started) / 60:5.1f} min: {record.count} chunks, RSS {mem['VmRSS']:.1f} MiB (anon "
                      f"{mem.get('RssAnon', float('nan')):.1f}, shmem {mem.get('RssShmem', float('nan')):.1f})",
                      flush=True)
        ended = time.monotonic()
        if schedule is not None:
            schedule.stop.set()
            schedule.join(60.0)
        time.sleep(1.5)
        text, facts = summarize(record, driver.statuses_since(0.0), warm, window, started, ended)
    finally:
        fault_file.unlink(missing_ok=True)
        node.stop()
        driver.close()
    output = node.output()
    facts["log"] = {"lines": output.count("\n"), "tracebacks": output.count("Traceback"),
                    "errors": output.count("[ERROR]"), "warnings": output.count("[WARN]")}
    node_profile = re.search(r"Fast DDS profile: (\S+)", output)
    header = (f"soak: {'GPU fp8 full-size' if args.gpu else 'CPU tiny'} demo model, rate_hz {rate:g}, "
              f"denoise_steps {args.steps}{', faults' if args.faults else ''}"
              f"{''.join(', ' + param for param in args.param)}, commit {commit}, node's DDS profile "
              f"{Path(node_profile.group(1)).name if node_profile else 'none named'}, peer's {profile.name}; node log "
              f"{facts['log']['lines']} lines ({facts['log']['errors']} ERROR, {facts['log']['warnings']} WARN, "
              f"{facts['log']['tracebacks']} tracebacks)")
    print("\n" + header + "\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(header + "\n\n" + text + "\n")
        samples = {"rss": record.rss, "gpu": record.gpu, "latencies_ms": [1e3 * x for x in record.latencies]}
        args.out.with_suffix(".json").write_text(json.dumps({"facts": facts, "samples": samples}))
        (args.out.parent / (args.out.stem + "_node.log")).write_text(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

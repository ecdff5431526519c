#!/usr/bin/env python3
"""The continuity table of docs/benchmarks.md: each hand-over strategy of the streaming queue (and chunk mode as
joint_trajectory_controller runs it) on recorded chunk sequences, measured at the control ticks.

    .venv/bin/python tools/handover_continuity.py [--seconds 30] [--out out/handover.md]

Sequences (chunks every 0.1 s, each arriving `latency` after its observation, action_dt 0.05 s):
- synthetic: a smooth true trajectory q*(t) (two sines per joint); chunk c predicts q*(t_obs + (k + 1) dt) plus an
  error that grows along the chunk (a random offset per chunk times (k + 1) / H, and a slow random drift), so
  consecutive chunks disagree the way a policy's do; horizon 50. The true trajectory gives the tracking error.
- demo: the built-in random-weight model (CPU, tiny, horizon 10) fed synthetic frames and sine joint states
  like demo_sources; its true trajectory is unknown, so no tracking error.
Metrics over the commands c_n (one per tick, target times n dt): largest jump max |c_{n+1} - c_n|; jerk at chunk
boundaries: |c_{n+1} - 3 c_n + 3 c_{n-1} - c_{n-2}| / dt^3 at the first target a new chunk changes (RMS and max);
tracking error: RMS of c_n - q*(n dt); in the closed loop also the hand-over gap, what a merge changes at the first
target a new chunk commands (|queued after - queued before|, max over joints). Units: the actions' (rad), seconds.
The queue and blends are pi05_ros.execution's own code; only the clock is simulated.

Real-time chunking (blend rtc) needs the chunk to be made while the queue runs, so it has its own closed-loop
table: at each inference start the queued actions the new chunk will overlap and the delay (latency in actions)
become an RtcRequest (pi05_ros.execution.rtc, pi05_ros.engine.rtc), and the chunk merges as replace. Two flow
policies, each with the same noise per chunk for every strategy (only the hand-over differs):
- flow: the synthetic policy as a Gaussian flow (GaussianFlowPolicy): the chunk's growing error offset is what the
  noise decides, so RTC can choose it; its velocity is exact (closed form), so is RTC's VJP; the truth is known;
- demo: the built-in random-weight model, guided through Policy.infer(rtc=...).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pi05_ros.execution.blend import BlendSettings
from pi05_ros.execution.plan import PlannedChunk
from pi05_ros.execution.queue import StreamQueue
from pi05_ros.execution.rtc import committed_actions, delay_actions

MS = 1_000_000
DT_NS = 50 * MS
PERIOD_NS = 100 * MS  # one chunk per 0.1 s (rate_hz 10)
STRATEGIES = [("replace", BlendSettings("replace")), ("crossfade (N=5)", BlendSettings("crossfade", 5)),
              ("weighted_average (0.7 new)", BlendSettings("weighted_average", new_weight=0.7)),
              ("temporal_ensemble (m=0.01)", BlendSettings("temporal_ensemble", ensemble_decay=0.01))]


@dataclass
class Recorded:
    name: str
    chunks: list[tuple[int, int, np.ndarray]]  # (t_obs_ns, arrival_ns, actions [H, J])
    truth: object | None  # callable t_s -> [J], or None


def true_trajectory(t: np.ndarray | float) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    return np.stack([0.5 * np.sin(1.3 * t) + 0.1 * np.sin(4.1 * t), 0.4 * np.cos(0.9 * t + 0.3)], axis=-1)


def synthetic(seconds: float, latency_ns: int, seed: int = 0, horizon: int = 50) -> Recorded:
    rng = np.random.default_rng(seed)
    chunks = []
    drift = np.zeros(2)
    for i in range(int(seconds * 1e9 // PERIOD_NS)):
        t_obs = 1_000 * MS + i * PERIOD_NS
        due = (t_obs + (np.arange(horizon) + 1) * DT_NS) / 1e9
        drift += rng.normal(0.0, 0.01, 2)
        offset = rng.normal(0.0, 0.05, 2)
        error = offset[None, :] * ((np.arange(horizon) + 1) / horizon)[:, None] + drift[None, :] * 0.2
        chunks.append((t_obs, t_obs + latency_ns, true_trajectory(due) + error))
    return Recorded("synthetic smooth policy (H=50)", chunks, true_trajectory)


def demo(seconds: float) -> Recorded:
    from pi05_ros.engine.policy import Policy

    policy = Policy.demo(device="cpu")
    chunks = []
    for i in range(int(seconds * 1e9 // PERIOD_NS)):
        t_obs = 1_000 * MS + i * PERIOD_NS
        t = t_obs / 1e9
        frame = np.full((240, 320, 3), 40, np.uint8)
        x = (i * 4) % 256
        frame[100:150, x:x + 50] = (220, 30, 30)
        state = np.array([0.6 * math.sin(0.5 * t + j) for j in range(policy.state_dim)], np.float32)
        chunk = policy.infer({"base_0_rgb": frame, "left_wrist_0_rgb": frame[::-1].copy()}, state,
                             "pick up the red cube", 10)
        latency_ns = int(chunk.timings["total"] * MS)
        chunks.append((t_obs, t_obs + max(latency_ns, 1), chunk.actions.astype(np.float64)))
    return Recorded("demo model (tiny, random weights, H=10)", chunks, None)


def stream_commands(recorded: Recorded, settings: BlendSettings) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(targets [n] ns, commands [n, J], indices where a new chunk first changed the command)."""
    joints = recorded.chunks[0][2].shape[1]
    queue = StreamQueue(DT_NS, joints)
    pending = sorted(recorded.chunks, key=lambda c: c[1])
    first_tick = pending[0][1] // DT_NS + 1
    last_tick = pending[-1][1] // DT_NS
    targets, commands, boundaries = [], [], []
    new_from: set[int] = set()
    for tick in range(first_tick, last_tick + 1):
        now = tick * DT_NS
        while pending and pending[0][1] < now:
            t_obs, arrival, actions = pending.pop(0)
            plan = PlannedChunk(t_obs, DT_NS, actions, np.zeros_like(actions), actions)
            report = queue.merge(plan, queue.next_target(arrival), settings)
            new_from.add(report.first_index)
        command = queue.pop(tick + 1)
        if command is None:
            continue
        if tick + 1 in new_from:
            boundaries.append(len(commands))
        targets.append((tick + 1) * DT_NS)
        commands.append(command.positions)
    return np.array(targets), np.array(commands), boundaries


def chunk_mode_commands(recorded: Recorded, max_age_ns: int = 500 * MS) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Chunk mode as JTC runs it (linear interpolation, positions only): at each arrival the trajectory is
    replaced; JTC goes from where it is to the first point still due, then along the bounded points."""
    chunks = sorted(recorded.chunks, key=lambda c: c[1])
    first_tick = chunks[0][1] // DT_NS + 1
    last_tick = chunks[-1][1] // DT_NS
    times: np.ndarray | None = None
    values: np.ndarray | None = None
    targets, commands, boundaries = [], [], []
    index = 0
    for tick in range(first_tick, last_tick + 1):
        now = (tick + 1) * DT_NS  # sampled at the same target times as the stream
        changed = False
        while index < len(chunks) and chunks[index][1] < tick * DT_NS:
            t_obs, arrival, actions = chunks[index]
            index += 1
            due = t_obs + (np.arange(len(actions)) + 1) * DT_NS
            keep = (due > arrival + 10 * MS) & (due <= t_obs + max_age_ns + DT_NS)
            if not keep.any():
                continue
            here = None if times is None else np.array([np.interp(arrival, times, values[:, j])
                                                        for j in range(values.shape[1])])
            new_times = due[keep].astype(np.float64)
            new_values = actions[keep]
            if here is not None:
                new_times = np.concatenate([[float(arrival)], new_times])
                new_values = np.vstack([here, new_values])
            times, values = new_times, new_values
            changed = True
        if times is None:
            continue
        if changed:
            boundaries.append(len(commands))
        targets.append(now)
        commands.append(np.array([np.interp(now, times, values[:, j]) for j in range(values.shape[1])]))
    return np.array(targets), np.array(commands), boundaries


def metrics(targets: np.ndarray, commands: np.ndarray, boundaries: list[int], truth) -> dict[str, float]:
    dt = DT_NS / 1e9
    jumps = np.abs(np.diff(commands, axis=0)).max()
    jerks = []
    for b in boundaries:
        if 2 <= b < len(commands) - 1:
            jerk = (commands[b + 1] - 3 * commands[b] + 3 * commands[b - 1] - commands[b - 2]) / dt**3
            jerks.append(np.abs(jerk).max())
    jerks_a = np.array(jerks) if jerks else np.zeros(1)
    out = {"jump": float(jumps), "jerk_rms": float(np.sqrt(np.mean(jerks_a**2))), "jerk_max": float(jerks_a.max())}
    if truth is not None:
        error = commands - truth(targets / 1e9)
        out["tracking_rms"] = float(np.sqrt(np.mean(error**2)))
    return out


# --- closed loop: chunks made while the queue runs (what RTC needs)

FLOW_OFFSET = 0.05  # std of a chunk's error offset (grows along the chunk, as in `synthetic`)
FLOW_SPREAD = 0.0005  # std of the independent per-action spread (its third differences are the jerk floor)
RTC_BETA = 5.0


def flow_mean(t_obs_ns: int, rng: np.random.Generator, drift: np.ndarray, horizon: int) -> np.ndarray:
    due = (t_obs_ns + (np.arange(horizon) + 1) * DT_NS) / 1e9
    drift += rng.normal(0.0, 0.01, 2)
    return true_trajectory(due) + drift * 0.2


class GaussianFlowPolicy:
    """The synthetic policy as a flow: per chunk and joint, actions a = mean + offset * b over the horizon with
    b ~ N(0, S), S = r r^T + (spread / offset)^2 I, r_k = (k + 1) / H (the chunk's error offset, growing along it,
    is what the noise decides). The flow runs on b, the policy's normalized units (unit scale, as real policies'
    normalized actions), x_t = t z + (1 - t) b (openpi's time), with the exact velocity E[z - b | x_t]:
    v = (t I - (1 - t) S)(t^2 I + (1 - t)^2 S)^-1 x, so RTC's clean estimate and VJP are exact too; RTC's previous
    chunk enters normalized, (queued - mean) / offset, as Policy normalizes it."""

    def __init__(self, horizon: int = 50, seed: int = 0) -> None:
        import torch

        self.horizon = horizon
        self._rng = np.random.default_rng(seed)
        self._drift = np.zeros(2)
        r = (np.arange(horizon) + 1) / horizon
        self._cov = torch.from_numpy(np.outer(r, r) + (FLOW_SPREAD / FLOW_OFFSET) ** 2 * np.eye(horizon))
        self._gains: dict[float, object] = {}

    def gain(self, t: float):  # noqa: ANN201
        import torch

        if t not in self._gains:
            eye = torch.eye(self.horizon, dtype=torch.float64)
            self._gains[t] = (t * eye - (1 - t) * self._cov) @ torch.linalg.inv(t * t * eye + (1 - t) ** 2 * self._cov)
        return self._gains[t]

    def velocity(self, x, t: float):  # noqa: ANN001, ANN201 - torch tensor [H, J], normalized units
        return self.gain(t) @ x

    def chunk(self, t_obs_ns: int, noise: np.ndarray, rtc) -> np.ndarray:  # noqa: ANN001 - engine RtcRequest
        import torch

        from pi05_ros.engine.reference import euler_schedule
        from pi05_ros.engine.rtc import Guidance, guided_velocity

        mean = flow_mean(t_obs_ns, self._rng, self._drift, self.horizon)
        x = torch.from_numpy(noise.astype(np.float64))
        guidance = None
        if rtc is not None:
            previous = np.zeros((self.horizon, mean.shape[1]))
            rows = slice(rtc.start, rtc.start + len(rtc.previous))
            previous[rows] = (rtc.previous - mean[rows]) / FLOW_OFFSET
            g = Guidance.build(previous, rtc.delay, rtc.start + len(rtc.previous), rtc.beta, rtc.schedule)
            g.weights[: rtc.start] = 0.0
            guidance = (torch.from_numpy(g.previous).double(), torch.from_numpy(g.weights).double(), g.beta)
        for t, dt in euler_schedule(10):
            if guidance is None:
                v = self.velocity(x, t)
            else:
                v = guided_velocity(lambda z, t=t: self.velocity(z, t), x, t, guidance[0], guidance[1], guidance[2])
            x = x + dt * v
        return mean + FLOW_OFFSET * x.numpy()


def closed_loop(make_chunk, chunks: int, latency_ns: int, settings: BlendSettings, joints: int,
                horizon: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(targets, commands, boundaries) of the stream: at each inference start (every PERIOD_NS) the chunk is made
    from what the queue holds (blend rtc: an RtcRequest; otherwise plain), arrives `latency_ns` later and merges
    with `settings` (rtc merges as replace)."""
    from pi05_ros.engine.rtc import RtcRequest

    queue = StreamQueue(DT_NS, joints)
    noise_rng = np.random.default_rng(7)
    targets, commands, boundaries = [], [], []
    gaps: list[float] = []
    new_from: set[int] = set()
    tick = (1_000 * MS) // DT_NS

    def run_ticks_until(ns: int) -> None:
        nonlocal tick
        while tick * DT_NS < ns:
            command = queue.pop(tick + 1)
            if command is not None:
                if tick + 1 in new_from:
                    boundaries.append(len(commands))
                targets.append((tick + 1) * DT_NS)
                commands.append(command.positions)
            tick += 1

    for i in range(chunks):
        t_obs = 1_000 * MS + i * PERIOD_NS
        run_ticks_until(t_obs)
        noise = noise_rng.standard_normal((horizon, joints))
        rtc = None
        if settings.strategy == "rtc":
            start, rows = committed_actions(queue.pending(0), t_obs, DT_NS, horizon)
            if len(rows):
                delay = delay_actions(t_obs, queue.next_target(t_obs + latency_ns), DT_NS)
                rtc = RtcRequest(rows, delay=delay, beta=RTC_BETA, start=start)
        actions = make_chunk(t_obs, noise, rtc)
        arrival = t_obs + latency_ns
        run_ticks_until(arrival)
        plan = PlannedChunk(t_obs, DT_NS, actions, np.zeros_like(actions), actions)
        first = queue.next_target(arrival)
        before = queue.pending(first)[:1]
        new_from.add(queue.merge(plan, first, settings).first_index)
        after = queue.pending(first)[:1]
        if before and after and before[0].index == after[0].index == first:
            gaps.append(float(np.abs(after[0].positions - before[0].positions).max()))
    run_ticks_until(tick * DT_NS + horizon * DT_NS)
    closed_loop.last_gaps = gaps  # the hand-over gaps of this run (closed_loop_table reports them)
    return np.array(targets), np.array(commands), boundaries


CLOSED_LOOP_STRATEGIES = [("replace", BlendSettings("replace")), ("crossfade (N=5)", BlendSettings("crossfade", 5)),
                          (f"rtc (beta {RTC_BETA:g}, exp)", BlendSettings("rtc"))]


def demo_policy_chunks():  # noqa: ANN201
    """make_chunk for the demo model: the frames and states of `demo`, Policy.infer with the given noise."""
    from pi05_ros.engine.policy import Policy

    policy = Policy.demo(device="cpu")

    def make(t_obs: int, noise: np.ndarray, rtc) -> np.ndarray:  # noqa: ANN001
        i = int((t_obs - 1_000 * MS) // PERIOD_NS)
        t = t_obs / 1e9
        frame = np.full((240, 320, 3), 40, np.uint8)
        x = (i * 4) % 256
        frame[100:150, x:x + 50] = (220, 30, 30)
        state = np.array([0.6 * math.sin(0.5 * t + j) for j in range(policy.state_dim)], np.float32)
        full = np.zeros((policy.action_horizon, policy.config.action_dim), np.float32)
        full[:, : noise.shape[1]] = noise
        chunk = policy.infer({"base_0_rgb": frame, "left_wrist_0_rgb": frame[::-1].copy()}, state,
                             "pick up the red cube", 10, noise=full, **({"rtc": rtc} if rtc is not None else {}))
        return chunk.actions.astype(np.float64)

    return make, policy.action_dof, policy.action_horizon


def closed_loop_table(seconds: float, latency_ms: float) -> str:
    rows = ["**closed loop, flow policies** (chunks made while the queue runs; same noise per chunk for every "
            f"strategy; latency {latency_ms:g} ms)", "",
            "| policy | strategy | hand-over gap mean / max | largest jump | boundary jerk RMS | boundary jerk max "
            "| tracking error RMS |",
            "|---|---|---|---|---|---|---|"]
    chunks = int(seconds * 1e9 // PERIOD_NS)
    latency = int(latency_ms * MS)
    for name, settings in CLOSED_LOOP_STRATEGIES:
        flow = GaussianFlowPolicy()
        m = metrics(*closed_loop(flow.chunk, chunks, latency, settings, 2, flow.horizon), true_trajectory)
        rows.append(f"| Gaussian flow (H=50) | {name} | {_gaps()} | {m['jump']:.4f} | {m['jerk_rms']:.1f} "
                    f"| {m['jerk_max']:.1f} | {m['tracking_rms']:.4f} |")
    for name, settings in CLOSED_LOOP_STRATEGIES:
        make, dof, horizon = demo_policy_chunks()
        m = metrics(*closed_loop(make, chunks, latency, settings, dof, horizon), None)
        rows.append(f"| demo model (H=10) | {name} | {_gaps()} | {m['jump']:.4f} | {m['jerk_rms']:.1f} "
                    f"| {m['jerk_max']:.1f} | n/a |")
    return "\n".join(rows)


def _gaps() -> str:
    gaps = np.array(closed_loop.last_gaps) if closed_loop.last_gaps else np.zeros(1)
    return f"{gaps.mean():.4f} / {gaps.max():.4f}"


def table(recorded: Recorded) -> str:
    rows = [f"**{recorded.name}**, {len(recorded.chunks)} chunks", "",
            "| strategy | largest jump | boundary jerk RMS | boundary jerk max | tracking error RMS |",
            "|---|---|---|---|---|"]
    runs = [("chunk mode (JTC, linear)", chunk_mode_commands(recorded))]
    runs += [(f"stream {name}", stream_commands(recorded, settings)) for name, settings in STRATEGIES]
    for name, (targets, commands, boundaries) in runs:
        m = metrics(targets, commands, boundaries, recorded.truth)
        tracking = f"{m['tracking_rms']:.4f}" if "tracking_rms" in m else "n/a"
        rows.append(f"| {name} | {m['jump']:.4f} | {m['jerk_rms']:.1f} | {m['jerk_max']:.1f} | {tracking} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--latency-ms", type=float, default=60.0, help="synthetic: observation to arrival")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = "\n\n".join([table(synthetic(args.seconds, int(args.latency_ms * MS))), table(demo(args.seconds)),
                         closed_loop_table(args.seconds, args.latency_ms)])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

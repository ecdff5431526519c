"""Real-time chunking on the streaming queue: what an inference must agree with, and how late it will arrive.

When an inference starts from an observation stamped t_obs, its action i is due at t_obs + (i + 1) P
(P = action_dt). The queue already holds commands for the coming control targets (entry n for time n P); those
the robot will run while the new chunk is denoised are committed. `committed_actions` reads the queued action
rows at the new chunk's due times (interpolated between grid points, as the queue itself samples chunks) for as
long as the queue covers them: the previous chunk of engine/rtc.py, row 0 = the new chunk's action 0.
`delay_actions` is how many of the new chunk's actions will not be commanded from it: those before the first
target the queue can still give it when it arrives (StreamQueue.next_target(tick start + latency)), the latency
(an inference tick's start to its chunk's publication, in the queue's clock) estimated as the largest of the
recent ones (as LeRobot does). The queue then merges the new chunk with `replace`
from that target: it already agrees. No ROS imports.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pi05_ros.execution.queue import QueuedCommand

LATENCY_WINDOW = 20  # inferences the delay estimate looks back over


@dataclass(frozen=True)
class RtcSettings:
    beta: float = 5.0  # the guidance weight's clip (0: plain inference)
    overlap: int = 0  # most previous actions to agree with (0: all the queue holds)
    schedule: str = "exp"  # the soft mask's decay: exp, linear, ones, zeros


def committed_actions(pending: Sequence[QueuedCommand], t_obs_ns: int, period_ns: int,
                      horizon: int) -> tuple[int, np.ndarray]:
    """(start, rows [n, dof]): rows[j] is the queued action at the due time of the new chunk's action start + j,
    t_obs + (start + j + 1) P; `start` is its first action still queued (the ones before have already run)."""
    by_index = {c.index: c.actions for c in pending}

    def queued_at(i: int) -> np.ndarray | None:
        n, rest = divmod(t_obs_ns + (i + 1) * period_ns, period_ns)
        if n not in by_index or (rest and n + 1 not in by_index):
            return None
        if not rest:
            return by_index[n]
        w = rest / period_ns
        return (1.0 - w) * by_index[n] + w * by_index[n + 1]

    start = next((i for i in range(horizon) if queued_at(i) is not None), horizon)
    rows = []
    for i in range(start, horizon):
        row = queued_at(i)
        if row is None:
            break
        rows.append(row)
    dof = len(pending[0].actions) if pending else 0
    return start, np.array(rows, dtype=np.float32).reshape(len(rows), dof)


def delay_actions(t_obs_ns: int, first_target: int, period_ns: int) -> int:
    """The new chunk's actions due before `first_target` (the first target it will command: t_obs + (i + 1) P
    < first_target * P), i.e. the ones the queue will run from the previous chunk meanwhile."""
    return max(0, math.ceil((first_target * period_ns - t_obs_ns) / period_ns) - 1)


class LatencyEstimate:
    """The largest of the last LATENCY_WINDOW latencies, tick start to publication (a cautious delay: too small a
    delay lets the guidance bend actions that will already have run)."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def add(self, latency_s: float) -> None:
        self._recent.append(latency_s)

    def value(self) -> float | None:
        return max(self._recent) if self._recent else None

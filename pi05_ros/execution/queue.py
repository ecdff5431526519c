"""The streaming queue: the upcoming command for each control target, and how a new chunk merges into it.

The control loop ticks at every multiple of the period P (= action_dt) of the ROS clock; at tick n (time n P) it
publishes the command for target n + 1, the end of the period that starts then (a position to be at, a
velocity to hold over it: plan.py). Entry n of the queue is that command, sampled from the chunks at time n P
and blended (blend.py). A chunk arriving while tick m is the next to run merges into targets m + 1 onwards;
its actions due at or before m P (whose period ended before the first one it can still command) are skipped
for lateness. Each entry remembers the observation stamp of the newest chunk in it, so stale commands can be
refused. For real-time chunking (issue 8) `pending` gives the targets already committed. No ROS imports.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from pi05_ros.execution.blend import Blended, BlendSettings, blend
from pi05_ros.execution.plan import PlannedChunk


@dataclass(frozen=True)
class QueuedCommand:
    index: int  # target index n: the command is for time n * period
    positions: np.ndarray
    velocities: np.ndarray
    actions: np.ndarray  # the blended action row (robot units)
    t_obs_ns: int  # observation stamp of the newest chunk blended into it
    sequence: int  # that chunk's sequence
    predictions: int  # how many chunks were blended into it


@dataclass(frozen=True)
class MergeReport:
    first_index: int  # the first target the chunk could still command
    merged: int  # targets it was blended into
    skipped_late: int  # its actions whose period had passed
    dropped: int  # queued targets beyond its last due action, dropped


class StreamQueue:
    def __init__(self, period_ns: int, joints: int) -> None:
        self.period_ns = period_ns
        self._joints = joints
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[Blended, int, int]] = {}  # index -> (blended, t_obs_ns, sequence)
        self._newest_t_obs_ns: int | None = None  # of the chunks merged since the last clear

    def next_target(self, now_ns: int) -> int:
        """The target of the next tick that runs after `now_ns` (tick m = now // P + 1, target m + 1)."""
        return now_ns // self.period_ns + 2

    def merge(self, chunk: PlannedChunk, first_index: int, settings: BlendSettings) -> MergeReport:
        """Blend `chunk` into the targets from `first_index` on (see the module docstring). A chunk observed
        before one already merged changes nothing (its stamp came out of order: it would overwrite newer targets
        with older ones and drop the newer tail): its report says merged 0."""
        period = self.period_ns
        start_of_first_period = (first_index - 1) * period
        skipped = sum(1 for k in range(chunk.horizon) if chunk.due_ns(k) <= start_of_first_period)
        low = max(first_index, -(-chunk.first_due_ns // period))  # ceil
        high = chunk.last_due_ns // period
        merged = 0
        with self._lock:
            if self._newest_t_obs_ns is not None and chunk.t_obs_ns < self._newest_t_obs_ns:
                return MergeReport(first_index, 0, skipped, 0)
            self._newest_t_obs_ns = chunk.t_obs_ns
            dropped = [n for n in self._entries if n > high]
            for n in dropped:
                del self._entries[n]
            for j, n in enumerate(range(low, high + 1)):
                sample = chunk.sample(n * period)
                if sample is None:  # pragma: no cover - low..high lie inside the chunk
                    continue
                new = np.concatenate(sample)
                old = self._entries.get(n)
                self._entries[n] = (blend(settings, old[0] if old else None, new, j), chunk.t_obs_ns, chunk.sequence)
                merged += 1
        return MergeReport(first_index, merged, skipped, len(dropped))

    def pop(self, index: int) -> QueuedCommand | None:
        """The command for target `index`, removed with every earlier one; None when the queue has none."""
        with self._lock:
            for n in [n for n in self._entries if n < index]:
                del self._entries[n]
            entry = self._entries.pop(index, None)
        return None if entry is None else self._command(index, entry)

    def pending(self, from_index: int) -> list[QueuedCommand]:
        """The queued commands from target `from_index` on, in order (what is committed while a chunk is made)."""
        with self._lock:
            items = sorted((n, e) for n, e in self._entries.items() if n >= from_index)
        return [self._command(n, e) for n, e in items]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._newest_t_obs_ns = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _command(self, index: int, entry: tuple[Blended, int, int]) -> QueuedCommand:
        blended, t_obs, sequence = entry
        j = self._joints
        value = blended.value
        return QueuedCommand(index, value[:j].copy(), value[j:2 * j].copy(), value[2 * j:].copy(), t_obs, sequence,
                             blended.predictions)

"""Stage timings: a clock that marks stage ends, the statistics of a series of them, and a sliding window."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch


class StageClock:
    """Host-side stage timer. On CUDA it synchronizes at each mark, so use it only on the reference path."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.timings: dict[str, float] = {}
        self._start = self._last = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, stage: str) -> None:
        """Record the time since the previous mark as `stage` (milliseconds)."""
        now = self._now()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = (self._now() - self._start) * 1e3
        return self.timings


def summarize(samples: list[float] | deque[float]) -> dict[str, float]:
    """mean, std, p50, p99, min, max (milliseconds in, milliseconds out) and count of `samples`."""
    a = np.asarray(samples, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max()), "count": int(a.size)}


class StageStats:
    """Per-stage timings of the last `window` inferences."""

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self._samples: dict[str, deque[float]] = {}

    def add(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self._samples.setdefault(stage, deque(maxlen=self.window)).append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        """`summarize` of each stage's window."""
        return {stage: summarize(samples) for stage, samples in self._samples.items()}

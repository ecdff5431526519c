"""How a new chunk takes over from the commands already queued for the same control ticks.

For a control target covered by both, with `old` the queued value and `new` the new chunk's value there, and
j = 0, 1, ... counting the targets from the first one the new chunk covers:
- replace: new (the newest chunk wins from its first due action);
- crossfade over N actions: (1 - w_j) old + w_j new, w_j = (j + 1) / (N + 1) for j < N, then 1 (N = 0: replace);
- weighted_average: (1 - w) old + w new with w = `new_weight` (LeRobot's async client: 0.3 old + 0.7 new);
  the queued value may itself be an average, so three chunks give 0.09 a1 + 0.21 a2 + 0.7 a3;
- temporal_ensemble (ACT): sum_i e^(-m i) a_i / sum_i e^(-m i) over every prediction a_i made for that target,
  i = 0 the oldest; m > 0 favours older predictions, m < 0 newer ones, m = 0 is the plain mean.
A target only the new chunk covers takes its value; queued targets after the new chunk's last one are dropped.
- rtc: the new chunk was denoised to agree with the queued actions (real-time chunking, execution/rtc.py and
  engine/rtc.py), so it merges as replace.
No ROS imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPLACE, CROSSFADE = "replace", "crossfade"
WEIGHTED_AVERAGE, TEMPORAL_ENSEMBLE = "weighted_average", "temporal_ensemble"
RTC = "rtc"
BLEND_STRATEGIES = (REPLACE, CROSSFADE, WEIGHTED_AVERAGE, TEMPORAL_ENSEMBLE, RTC)


@dataclass(frozen=True)
class BlendSettings:
    strategy: str = REPLACE
    crossfade_actions: int = 5  # N
    new_weight: float = 0.7  # weighted_average: weight of the new chunk (the queued value gets 1 - new_weight)
    ensemble_decay: float = 0.01  # temporal_ensemble: m in e^(-m i)

    def __post_init__(self) -> None:
        if self.strategy not in BLEND_STRATEGIES:
            raise ValueError(f"blend '{self.strategy}' is unknown; use one of {', '.join(BLEND_STRATEGIES)}")


def crossfade_weight(j: int, n: int) -> float:
    """Weight of the new chunk at the j-th shared target of a crossfade over n actions."""
    return (j + 1) / (n + 1) if j < n else 1.0


def ensemble_weight(i: int, decay: float) -> float:
    """Weight of the i-th prediction (i = 0 the oldest) of a temporal ensemble."""
    return math.exp(-decay * i)


@dataclass
class Blended:
    """The value queued for one target, with what a temporal ensemble needs to add the next prediction."""

    value: np.ndarray
    predictions: int = 1
    weighted_sum: np.ndarray | None = None  # sum_i w_i a_i (temporal_ensemble)
    weight_sum: float = 1.0
    relative: bool = False  # the sums are relative to the newest weight (a negative decay), not absolute


def blend(settings: BlendSettings, old: Blended | None, new: np.ndarray, j: int) -> Blended:
    """The value for a target after the new chunk's value `new` arrives (see the module docstring)."""
    new = np.asarray(new, dtype=np.float64)
    strategy = settings.strategy
    if strategy == TEMPORAL_ENSEMBLE:
        if old is None:
            return Blended(new.copy(), 1, new.copy(), 1.0, settings.ensemble_decay < 0)
        decay = settings.ensemble_decay
        relative = decay < 0
        if old.weighted_sum is None or old.relative != relative:
            # blended by another strategy, or its sums kept on the other scale (the decay's sign changed at run
            # time): the value queued so far counts as the first prediction of a new ensemble
            old = Blended(old.value.copy(), 1, old.value.copy(), 1.0, relative)
        if not relative:  # weights e^(-m i) shrink: kept as they are
            w = ensemble_weight(old.predictions, decay)
            total, weight = old.weighted_sum + w * new, old.weight_sum + w
        else:  # weights grow (newer counts more): the sums are kept relative to the newest weight, which is 1,
            # since e^(-m i) itself overflows a float past i = 709 / |m| (71 predictions at m = -10)
            shrink = math.exp(decay)
            total, weight = old.weighted_sum * shrink + new, old.weight_sum * shrink + 1.0
        return Blended(total / weight, old.predictions + 1, total, weight, relative)
    if old is None or strategy in (REPLACE, RTC):
        return Blended(new.copy())
    if strategy == CROSSFADE:
        w = crossfade_weight(j, settings.crossfade_actions)
    else:
        w = settings.new_weight
    if w == 1.0:
        return Blended(new.copy(), old.predictions + 1)
    return Blended((1.0 - w) * old.value + w * new, old.predictions + 1)

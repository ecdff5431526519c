"""The streaming queue and each hand-over strategy against its formula (blend.py), on chunks whose due times lie
on the control grid, so every queued value is an action or a blend of actions (no interpolation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pi05_ros.execution.blend import Blended, BlendSettings, blend, crossfade_weight, ensemble_weight
from pi05_ros.execution.plan import CommandColumns, PlannedChunk
from pi05_ros.execution.queue import StreamQueue

MS = 1_000_000
P = 50 * MS
COLUMNS = CommandColumns(("a",), (0,), ("position",), (0,))


def chunk(t_obs_ns: int, values, sequence: int = 0) -> PlannedChunk:
    values = np.asarray(values, dtype=np.float64)[:, None]
    return PlannedChunk(t_obs_ns, P, values, np.zeros_like(values), values.copy(), sequence)


def drain(queue: StreamQueue, first: int, count: int) -> list[float]:
    out = []
    for n in range(first, first + count):
        command = queue.pop(n)
        out.append(math.nan if command is None else float(command.positions[0]))
    return out


def test_late_actions_are_skipped_and_the_rest_land_at_their_due_targets() -> None:
    queue = StreamQueue(P, 1)
    # Observation at t = 1.0 s, arriving at 1.31 s: the next tick is 1.35 s (n = 27), it commands target 28.
    now = 1_310 * MS
    first = queue.next_target(now)
    assert first == 28
    report = queue.merge(chunk(1_000 * MS, np.arange(10.0)), first, BlendSettings())
    # action k is due at 1.0 + 0.05 (k + 1) s = target 21 + k; targets <= 27 (periods ending by 1.35 s) passed
    assert report.skipped_late == 7 and report.merged == 3
    assert drain(queue, 28, 3) == [7.0, 8.0, 9.0]
    assert queue.pop(31) is None


def test_replace_takes_every_shared_target() -> None:
    queue = StreamQueue(P, 1)
    queue.merge(chunk(0, [1.0] * 10), 1, BlendSettings("replace"))
    queue.merge(chunk(3 * P, [2.0] * 10), 5, BlendSettings("replace"))  # covers targets 4..13, from 5 on
    assert drain(queue, 1, 13) == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_crossfade_is_linear_over_n_actions() -> None:
    settings = BlendSettings("crossfade", crossfade_actions=3)
    queue = StreamQueue(P, 1)
    queue.merge(chunk(0, [0.0] * 10), 1, settings)  # targets 1..10
    queue.merge(chunk(2 * P, [1.0] * 10), 4, settings)  # targets 3..12, shared from 4
    weights = [crossfade_weight(j, 3) for j in range(5)]
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert drain(queue, 4, 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert crossfade_weight(0, 0) == 1.0  # N = 0: replace


def test_weighted_average_is_0_3_old_plus_0_7_new_and_compounds() -> None:
    settings = BlendSettings("weighted_average")  # new_weight 0.7
    queue = StreamQueue(P, 1)
    queue.merge(chunk(0, [1.0] * 10), 1, settings)
    queue.merge(chunk(P, [2.0] * 10), 2, settings)
    queue.merge(chunk(2 * P, [4.0] * 10), 3, settings)
    values = drain(queue, 1, 12)
    assert values[0] == 1.0 and values[1] == pytest.approx(0.3 * 1 + 0.7 * 2)
    assert values[2] == pytest.approx(0.09 * 1 + 0.21 * 2 + 0.7 * 4)
    assert values[10] == pytest.approx(0.3 * 2 + 0.7 * 4)  # target 11: chunks 2 and 3 only
    assert values[11] == 4.0  # only the newest covers target 12
    other = BlendSettings("weighted_average", new_weight=0.5)
    q2 = StreamQueue(P, 1)
    q2.merge(chunk(0, [1.0] * 3), 1, other)
    q2.merge(chunk(0, [3.0] * 3), 1, other)
    assert drain(q2, 1, 1) == [2.0]


@pytest.mark.parametrize("decay", [-10.0, -0.3, 10.0])
def test_temporal_ensemble_runs_for_as_many_predictions_as_a_fast_node_makes(decay: float) -> None:
    """At 30 Hz and 50 actions a target is predicted ~70 times: e^(-m i) overflowed a float at m = -10 from the
    71st (an OverflowError out of every merge: no chunk reached the queue); the mean is the same weighted one."""
    settings = BlendSettings("temporal_ensemble", ensemble_decay=decay)
    value = None
    predictions = [float(i % 7) for i in range(300)]
    for i, prediction in enumerate(predictions):
        value = blend(settings, value, np.array([prediction]), i)
    assert value.predictions == 300 and np.isfinite(value.value).all()
    # the exact weighted mean, from the weights relative to the heaviest (which never overflow)
    exponents = -decay * np.arange(300)
    weights = np.exp(exponents - exponents.max())
    assert value.value[0] == pytest.approx(float(np.dot(weights, predictions) / weights.sum()), rel=1e-9)


@pytest.mark.parametrize("decay", [0.01, 0.5, -0.3, 0.0])
def test_temporal_ensemble_weights_exp_minus_m_i_with_i_0_the_oldest(decay: float) -> None:
    settings = BlendSettings("temporal_ensemble", ensemble_decay=decay)
    queue = StreamQueue(P, 1)
    predictions = [1.0, 2.0, 4.0, 8.0]
    for i, value in enumerate(predictions):
        queue.merge(chunk(i * P, [value] * 10), 1 + i, settings)
    weights = np.array([ensemble_weight(i, decay) for i in range(4)])
    assert weights[0] == 1.0 and weights[1] == pytest.approx(math.exp(-decay))
    expected = float(np.dot(weights, predictions) / weights.sum())
    # target 4 is covered by all four chunks (their targets: 1..10, 2..11, 3..12, 4..13)
    assert drain(queue, 4, 1) == [pytest.approx(expected, rel=1e-12)]
    command = queue.pending(5)[0]
    assert command.predictions == 4 and command.sequence == 0


def test_queued_targets_after_the_new_chunk_are_dropped_and_earlier_ones_kept() -> None:
    queue = StreamQueue(P, 1)
    queue.merge(chunk(0, [1.0] * 10), 1, BlendSettings())  # targets 1..10
    report = queue.merge(chunk(4 * P, [2.0] * 3), 1, BlendSettings())  # targets 5..7 only
    assert report.dropped == 3 and report.merged == 3
    assert drain(queue, 1, 10) == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0] + [math.nan] * 3


def test_between_grid_points_the_chunk_is_interpolated() -> None:
    queue = StreamQueue(P, 1)
    queue.merge(chunk(P // 2, np.arange(6.0)), 1, BlendSettings())  # due at 75, 125, ... ms
    assert drain(queue, 2, 3) == [0.5, 1.5, 2.5]
    assert queue.pending(0) == [] or queue.pending(0)[0].index > 4


def test_a_chunk_observed_before_one_already_queued_changes_nothing() -> None:
    """Stamps can come out of order (a topic's messages arriving out of stamp order, the stamp rule switching
    between header and arrival time): the older chunk would overwrite newer targets and drop the newer tail."""
    queue = StreamQueue(P, 1)
    queue.merge(chunk(100 * P, [2.0] * 10, sequence=2), 102, BlendSettings())
    before = [(c.index, float(c.positions[0]), c.sequence) for c in queue.pending(0)]
    report = queue.merge(chunk(95 * P, [1.0] * 10, sequence=1), 102, BlendSettings())
    assert report.merged == 0 and report.dropped == 0
    assert [(c.index, float(c.positions[0]), c.sequence) for c in queue.pending(0)] == before
    queue.clear()  # a hold or a reactivation starts over: any stamp is taken again
    assert queue.merge(chunk(95 * P, [1.0] * 10, sequence=1), 97, BlendSettings()).merged > 0


def test_a_temporal_ensemble_restarts_from_the_queued_value_when_its_weights_change_scale() -> None:
    """The decay's sign changed at run time, or the value was blended by another strategy: the sums kept so far are
    on another scale, so the queued value counts as the first prediction of a new ensemble."""
    values = [np.array([v]) for v in (1.0, 0.0, 0.0, 0.0, 0.0)]
    old = None
    for v in values[:4]:
        old = blend(BlendSettings("temporal_ensemble", ensemble_decay=-1.0), old, v, 0)
    after = blend(BlendSettings("temporal_ensemble", ensemble_decay=1.0), old, values[4], 0)
    fresh = blend(BlendSettings("temporal_ensemble", ensemble_decay=1.0),
                  blend(BlendSettings("temporal_ensemble", ensemble_decay=1.0), None, old.value, 0), values[4], 0)
    assert after.value[0] == pytest.approx(fresh.value[0], rel=1e-12) and after.predictions == 2
    averaged = blend(BlendSettings("weighted_average", new_weight=0.5), Blended(np.array([0.0])), np.array([1.0]), 0)
    ensemble = blend(BlendSettings("temporal_ensemble", ensemble_decay=0.0), averaged, np.array([1.0]), 0)
    assert ensemble.value[0] == pytest.approx((0.5 + 1.0) / 2)  # two predictions of equal weight: 0.5 and 1.0

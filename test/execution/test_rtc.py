"""Real-time chunking on the streaming queue (pi05_ros/execution/rtc.py): what a new chunk must agree with."""

from __future__ import annotations

import numpy as np

from pi05_ros.execution.blend import BlendSettings, blend
from pi05_ros.execution.plan import PlannedChunk
from pi05_ros.execution.queue import StreamQueue
from pi05_ros.execution.rtc import LatencyEstimate, committed_actions, delay_actions

MS = 1_000_000
P = 50 * MS


def queue_with(actions: np.ndarray, t_obs_ns: int) -> StreamQueue:
    queue = StreamQueue(P, actions.shape[1])
    chunk = PlannedChunk(t_obs_ns, P, actions, np.zeros_like(actions), actions)
    queue.merge(chunk, 0, BlendSettings("replace"))
    return queue


def test_committed_actions_are_the_queued_rows_at_the_new_chunks_due_times() -> None:
    actions = np.arange(20, dtype=np.float64).reshape(10, 2)  # due at 1.05 s, 1.10 s, ...
    queue = queue_with(actions, 1_000 * MS)
    # a new observation 0.1 s later on the grid: its action i is due at 1.15 s + i P = the old action i + 2
    start, rows = committed_actions(queue.pending(0), 1_100 * MS, P, horizon=10)
    assert start == 0
    np.testing.assert_allclose(rows, actions[2:])
    # off the grid by 20 ms: interpolated between queued targets, as the queue samples chunks
    start, rows = committed_actions(queue.pending(0), 1_120 * MS, P, horizon=10)
    np.testing.assert_allclose(rows[0], 0.6 * actions[2] + 0.4 * actions[3])
    assert len(rows) == 7  # the last due time past the queue's end has no queued action


def test_actions_already_run_are_skipped_with_their_offset() -> None:
    actions = np.arange(20, dtype=np.float64).reshape(10, 2)
    queue = queue_with(actions, 1_000 * MS)
    queue.pop(23)  # the control loop has run targets up to 1.15 s
    start, rows = committed_actions(queue.pending(0), 1_000 * MS, P, horizon=10)
    assert start == 3  # the new chunk's actions 0-2 (1.05 .. 1.15 s) have run
    np.testing.assert_allclose(rows, actions[3:])
    empty = StreamQueue(P, 2)
    start, rows = committed_actions(empty.pending(0), 1_000 * MS, P, horizon=10)
    assert rows.shape == (0, 0)


def test_delay_counts_the_actions_the_queue_runs_before_the_new_chunk() -> None:
    queue = StreamQueue(P, 2)
    # observation at 1.0 s, inference from 1.02 s for 0.09 s: arrives at 1.11 s, after tick 22 (1.10 s) ran;
    # the next tick (1.15 s) commands target 24 (1.20 s): the new chunk's actions 0-2 (1.05-1.15 s) do not run
    assert queue.next_target(1_110 * MS) == 24
    assert delay_actions(1_000 * MS, queue.next_target(1_110 * MS), P) == 3
    assert delay_actions(1_000 * MS, queue.next_target(1_000 * MS), P) == 1  # no latency: one tick in between
    assert delay_actions(1_020 * MS, 24, P) == 3  # off the grid: due 1.07, 1.12, 1.17 s before 1.20 s
    estimate = LatencyEstimate(window=3)
    assert estimate.value() is None
    for latency in (0.08, 0.12, 0.05, 0.06, 0.07):
        estimate.add(latency)
    assert estimate.value() == 0.07  # the largest of the last three


def test_rtc_blend_merges_as_replace() -> None:
    old = blend(BlendSettings("replace"), None, np.ones(3), 0)
    assert np.array_equal(blend(BlendSettings("rtc"), old, np.full(3, 2.0), 0).value, np.full(3, 2.0))

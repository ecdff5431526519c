"""The dynamic batcher on its own (in-process, a recording batch function): the window, the batch limit, FIFO order,
rows that cannot share a batch, clients that leave, per-row errors, the bounded queue, fairness."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from pi05_ros.serve.batching import Batcher, ServerBusy


class Recorder:
    """A batch function that records each batch and answers item -> item * 10 (or the item itself if it is an
    Exception), after `delay_s`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.delay_s)
        return [item if isinstance(item, Exception) else item * 10 for item in items]


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_requests_within_the_window_run_as_one_batch() -> None:
    recorder = Recorder()

    async def main() -> list:
        batcher = Batcher(recorder, window_s=0.5, max_batch=8)

        async def later(item: int, delay: float) -> Any:
            await asyncio.sleep(delay)
            return await batcher.submit(item)

        results = await asyncio.gather(batcher.submit(1), later(2, 0.05), later(3, 0.1))
        await batcher.close()
        return results

    results = run(main())
    assert recorder.batches == [[1, 2, 3]]
    assert [r.value for r in results] == [10, 20, 30] and {r.batch_size for r in results} == {3}


def test_a_lone_request_waits_one_window_and_no_longer_than_needed() -> None:
    recorder = Recorder()

    async def main() -> Any:
        batcher = Batcher(recorder, window_s=0.2, max_batch=8)
        start = time.monotonic()
        result = await batcher.submit(7)
        elapsed = time.monotonic() - start
        await batcher.close()
        return result, elapsed

    result, elapsed = run(main())
    assert result.value == 70 and result.batch_size == 1
    assert elapsed >= 0.19 and result.queue_ms >= 190  # the window was waited out (monotonic clock)


def test_a_full_batch_runs_without_waiting_out_the_window() -> None:
    recorder = Recorder()

    async def main() -> float:
        batcher = Batcher(recorder, window_s=30.0, max_batch=3)
        start = time.monotonic()
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        elapsed = time.monotonic() - start
        await batcher.close()
        return elapsed

    assert run(main()) < 20  # far less than the 30 s window: max_batch was reached
    assert recorder.batches == [[0, 1, 2]]


def test_batches_are_first_in_first_out_and_at_most_max_batch() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.05, max_batch=4)
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()

    run(main())
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_rows_that_cannot_share_a_batch_lead_the_next_one() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.05, max_batch=8, group=lambda item: item % 2)
        await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3, 4, 5)))
        await batcher.close()

    run(main())
    assert recorder.batches == [[1, 3, 5], [2, 4]]


def test_requests_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    recorder = Recorder(delay_s=0.3)

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.01, max_batch=8)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.1)  # the first batch is running now
        await asyncio.gather(first, *(batcher.submit(i) for i in (1, 2, 3)))
        await batcher.close()

    run(main())
    assert recorder.batches == [[0], [1, 2, 3]]


def test_the_window_counts_from_the_end_of_the_batch_before() -> None:
    """A request that waited out its window behind a running batch still waits one window after that batch ends,
    so the clients that batch answered can join it (robots in closed loop would otherwise settle into split
    batches). Timings: the batch runs 0.4 s; the window is 0.3 s, much longer than the 0.1 s between the end of
    the first batch and the late request."""
    recorder = Recorder(delay_s=0.4)

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.3, max_batch=8)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.35)  # the first batch is running (since ~0.3 s); it ends at ~0.7 s
        early = asyncio.ensure_future(batcher.submit(1))  # its own window passes at ~0.65 s, during the batch
        await first  # ~0.7 s
        await asyncio.sleep(0.1)
        await asyncio.gather(early, batcher.submit(2))
        await batcher.close()

    run(main())
    assert recorder.batches == [[0], [1, 2]]


def test_a_batch_runs_at_once_when_no_other_client_can_send() -> None:
    """With `senders` (open connections) known, a lone robot's request does not wait out the window, and a fleet
    whose every client has a request waiting runs before the window ends."""
    recorder = Recorder()
    connections = 1

    async def main() -> tuple[Any, float, float]:
        nonlocal connections
        batcher = Batcher(recorder, window_s=30.0, max_batch=8, senders=lambda: connections)
        start = time.monotonic()
        alone = await batcher.submit(7)
        alone_s = time.monotonic() - start
        connections = 3
        start = time.monotonic()
        await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)))
        fleet_s = time.monotonic() - start
        await batcher.close()
        return alone, alone_s, fleet_s

    alone, alone_s, fleet_s = run(main())
    assert alone.batch_size == 1 and alone_s < 20 and fleet_s < 20  # far less than the 30 s window
    assert recorder.batches == [[7], [1, 2, 3]]


def test_robots_in_closed_loop_that_start_apart_end_up_in_full_batches() -> None:
    """8 clients, each sending again 5 ms after its answer, starting 12 ms apart: the first batch is split (the
    window is 20 ms, the batch runs 50 ms), then every batch holds all 8. With the window counted from each
    request's arrival alone, this fleet stays split for good (the late ones lead a small batch while the others'
    answers are out)."""
    recorder = Recorder(delay_s=0.05)
    rounds = 12

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.02, max_batch=8)

        async def robot(name: int) -> None:
            await asyncio.sleep(0.012 * name)
            for round_ in range(rounds):
                await batcher.submit(name * 100 + round_)
                await asyncio.sleep(0.005)

        await asyncio.gather(*(robot(r) for r in range(8)))
        await batcher.close()

    run(main())
    sizes = [len(batch) for batch in recorder.batches]
    assert sizes[0] < 8, sizes  # the fleet did start split
    # the first batch's robots are a round ahead from then on, and their last round runs without them
    assert sizes[1:-1] == [8] * (len(sizes) - 2) and sizes[-1] == 8 - sizes[0], sizes


def test_a_request_whose_client_left_is_dropped_before_it_runs() -> None:
    recorder = Recorder()

    async def main() -> int:
        batcher = Batcher(recorder, window_s=0.3, max_batch=8)
        leaving = asyncio.ensure_future(batcher.submit(1))
        staying = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        leaving.cancel()  # what the server does when the client's connection closes
        assert (await staying).value == 20
        await batcher.close()
        return batcher.dropped

    assert run(main()) == 1
    assert recorder.batches == [[2]]


def test_a_withdrawn_request_stops_counting_as_pending_at_once_while_a_batch_runs() -> None:
    """/stats' `pending` is what waits for a batch: a request whose client left is not, though the loop sweeps it out
    of the queue only after the batch that runs meanwhile (seen as a stale count of 1 in a Ray test)."""
    recorder = Recorder(delay_s=0.5)

    async def main() -> list[int]:
        batcher = Batcher(recorder, window_s=0.0, max_batch=8)
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.1)  # 1 runs (for 0.5 s)
        leaving = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        counts = [batcher.pending]
        leaving.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the job's future
        counts.append(batcher.pending)
        assert len(batcher._pending) == 1 and not running.done()  # still queued: the sweep has not come yet
        await running
        await batcher.close()
        return counts

    assert run(main()) == [1, 0]
    assert recorder.batches == [[1]]


def test_errors_reach_only_their_own_request_and_the_batcher_goes_on() -> None:
    def failing(items: Sequence[Any]) -> list[Any]:
        if "boom" in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {i}") if i == 2 else i * 10 for i in items]

    async def main() -> list:
        batcher = Batcher(failing, window_s=0.05, max_batch=8)
        first = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)
        second = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
        third = await batcher.submit(4)
        await batcher.close()
        return [*first, *second, third.value]

    one, two, three, boom, four = run(main())
    assert one.value == 10 and three.value == 30
    assert isinstance(two, ValueError) and str(two) == "bad 2"
    assert isinstance(boom, RuntimeError) and four == 40


def test_a_full_queue_answers_server_busy() -> None:
    recorder = Recorder(delay_s=0.2)

    async def main() -> list:
        batcher = Batcher(recorder, window_s=0.5, max_batch=8, max_pending=3)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
        await batcher.close()
        return results

    results = run(main())
    assert [r.value for r in results[:3]] == [0, 10, 20]
    assert all(isinstance(r, ServerBusy) and "3 requests are already waiting" in str(r) for r in results[3:])


def test_requests_whose_clients_left_do_not_fill_the_queue() -> None:
    """Clients that give up during a long batch (a first-use compile) and ask again must not make the queue refuse
    everyone with ServerBusy: requests withdrawn while waiting do not count against max_pending."""
    recorder = Recorder(delay_s=0.3)

    async def main() -> list:
        batcher = Batcher(recorder, window_s=0.0, max_batch=1, max_pending=2)
        running = asyncio.ensure_future(batcher.submit(1))  # runs alone for 0.3 s
        await asyncio.sleep(0.05)
        gone = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]  # the queue is full now
        await asyncio.sleep(0.05)
        for job in gone:
            job.cancel()  # their clients left
        await asyncio.sleep(0)
        results = await asyncio.gather(running, batcher.submit(4), batcher.submit(5), return_exceptions=True)
        await batcher.close()
        return results

    results = run(main())
    assert [r.value for r in results] == [10, 40, 50], results
    assert recorder.batches == [[1], [4], [5]]


def test_one_row_per_client_in_a_batch_and_nobody_starves() -> None:
    """Clients that each wait for their answer before sending again (openpi's protocol) share every batch: a
    fast client cannot take two seats of one batch while another waits."""
    recorder = Recorder(delay_s=0.01)

    async def main() -> None:
        batcher = Batcher(recorder, window_s=0.02, max_batch=2)

        async def client(name: int) -> None:
            for round_ in range(6):
                await batcher.submit(name * 100 + round_)

        await asyncio.gather(*(client(c) for c in range(3)))
        await batcher.close()

    run(main())
    for batch in recorder.batches:
        clients = [item // 100 for item in batch]
        assert len(clients) == len(set(clients)), recorder.batches
    assert sorted(item for batch in recorder.batches for item in batch) == sorted(
        c * 100 + r for c in range(3) for r in range(6))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window_s"):
        Batcher(Recorder(), window_s=-1)
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Recorder(), max_batch=0)


def test_closing_while_a_batch_runs_ends_its_requests() -> None:
    """close() while a batch runs: its requests end (cancelled) with the queued ones; nobody waits for ever."""
    recorder = Recorder(delay_s=0.3)

    async def main() -> list:
        batcher = Batcher(recorder, window_s=0.0, max_batch=2)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.1)  # two running, one queued
        await batcher.close()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)

    results = run(main())
    assert [type(r).__name__ for r in results] == ["CancelledError"] * 3

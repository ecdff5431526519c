"""Dynamic batching: requests from many connections that arrive within a short window run as one batch.

    batcher = Batcher(run_rows, window_s=0.005, max_batch=8)
    result = await batcher.submit(item)          # from any connection's coroutine

How a batch forms: the oldest waiting request opens the window, which runs from its arrival or from the end of
the batch before, whichever is later. The batch runs when `max_batch` requests that can share it are waiting, when
no other request can come (`senders`: every open connection already has one waiting), or when the window has
passed, whichever is first; so a request waits at most one window after the batch running ahead of it. Counting
the window from the previous batch's end matters for robots in closed loop: the clients a batch answered send
again a moment after it ends, and they join the few that arrived while it ran (counted from arrival, those few
would start alone, and the fleet would settle into split batches: measured, 8 robots at a mean batch of 5.1,
docs/benchmarks.md §43). Knowing who can still send matters for one robot: it never waits for a batch mate.

Fairness: the queue is first in, first out, and every connection has at most one request in flight (openpi's
protocol is request-reply and the server reads a connection's next frame only after answering it), so a batch
holds at most one row per connection and no client can crowd out another. Requests that cannot share a batch
(another denoise step count: `group`) keep their place and lead a later batch. A request whose client has gone
(its awaiting task cancelled) is dropped before it runs.

Batches run on worker threads, so the event loop stays free to read, decode and answer other connections while
a batch runs. One run function is one lane: batches run one at a time, on its one thread. Several (`Batcher([run_a,
run_b], ...)`, pi05-serve's `--lanes`) run batches at once, each lane on its own thread; the next batch forms when
a lane is free and goes to it. Requests of a running batch count as in flight: with every open connection either
waiting or in flight, the batch runs without waiting out its window. The queue is bounded (`max_pending`):
`submit` raises `ServerBusy` when it is full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


RunBatch = Callable[[Sequence[Any]], Sequence[Any]]


class ServerBusy(RuntimeError):
    """The batch queue is full: more requests are waiting than the server allows."""


@dataclass
class _Job:
    item: Any
    group: Hashable
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchResult:
    """What `submit` returns: the row's result and how it was batched."""

    value: Any
    batch_size: int
    queue_ms: float  # from submit to the start of its batch
    run_ms: float  # the batch's run (the batch function, on the batch thread)
    finished: float  # time.monotonic() when the batch's run ended


class Batcher:
    """Collects items from many coroutines and runs them in batches through `run(items) -> results` (one result
    per item, in order; a result that is an Exception is raised in that item's `submit`). `run` may be a list of
    such functions: lanes, each running its own batches on its own thread."""

    def __init__(self, run: RunBatch | Sequence[RunBatch], *, window_s: float = 0.005,
                 max_batch: int = 8, max_pending: int = 256,
                 group: Callable[[Any], Hashable] = lambda item: None,
                 senders: Callable[[], int] | None = None) -> None:
        """`senders()`: how many clients could have a request in the queue (a server's open connections, each
        with at most one request in flight); None: unknown, every batch waits out its window unless full."""
        if window_s < 0 or max_batch < 1 or max_pending < 1:
            raise ValueError("window_s must be >= 0, max_batch and max_pending >= 1")
        self.lanes: list[RunBatch] = list(run) if isinstance(run, Sequence) else [run]
        if not self.lanes:
            raise ValueError("a Batcher needs at least one run function")
        self.window_s, self.max_batch, self.max_pending = window_s, max_batch, max_pending
        self.group, self.senders = group, senders
        self._pending: deque[_Job] = deque()
        self._jobs_by_id: dict[int, _Job] = {}  # the jobs of running batches
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pi05-batch{i}")
                           for i in range(len(self.lanes))]
        self.batch_sizes: Counter[int] = Counter()
        self.dropped = 0  # requests whose client left before their batch ran

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, item: Any) -> BatchResult:
        """Run `item` in the next batch that can take it; raises what `run` raised or returned for it."""
        self._drop_abandoned()  # clients that left during a long batch must not fill the queue for the others
        if len(self._pending) >= self.max_pending:
            raise ServerBusy(f"{len(self._pending)} requests are already waiting (the server's limit); try again")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pi05-batcher")
        job = _Job(item, self.group(item), asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrival.set()
        return await job.future  # cancelling this (the client left) cancels the job's future too

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._running):
            task.cancel()  # its rows' submit() calls are cancelled (_run_batch)
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        for executor in self._executors:  # a batch already on a lane's thread finishes; the loop stays free
            await asyncio.to_thread(executor.shutdown, wait=True)

    # --- the batching loop

    async def _loop(self) -> None:
        free: asyncio.Queue[tuple[int, float]] = asyncio.Queue()  # (lane, monotonic time it became free)
        for lane in range(len(self.lanes)):
            free.put_nowait((lane, 0.0))
        while True:
            lane, free_since = await free.get()
            batch = await self._next_batch(free_since)
            for job in batch:
                self._jobs_by_id[id(job)] = job
            task = asyncio.get_running_loop().create_task(self._run_batch(lane, batch, free), name="pi05-batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, lane: int, batch: list[_Job], free: asyncio.Queue[tuple[int, float]]) -> None:
        start = time.monotonic()
        try:
            results, run_ms, finished = await asyncio.get_running_loop().run_in_executor(
                self._executors[lane], self._timed_run, self.lanes[lane], [job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} rows")
        except asyncio.CancelledError:  # close(): nobody waits for these rows any more
            for job in batch:
                job.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every row of the batch hears of it; the loop goes on
            log.exception("a batch of %d failed", len(batch))
            results, run_ms, finished = [exc] * len(batch), 0.0, 0.0
        finally:
            for job in batch:
                self._jobs_by_id.pop(id(job), None)
            free.put_nowait((lane, time.monotonic()))
        self.batch_sizes[len(batch)] += 1
        for job, result in zip(batch, results, strict=True):
            if job.future.done():  # the client left while its batch ran
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(BatchResult(result, len(batch), (start - job.arrived) * 1e3, run_ms, finished))

    def _in_flight(self) -> int:
        """Requests in running batches whose client still waits (one that left can send again on a new
        connection, which senders() counts)."""
        return sum(1 for job in self._jobs_by_id.values() if not job.future.done())

    @staticmethod
    def _timed_run(run: RunBatch, items: list[Any]) -> tuple[Sequence[Any], float, float]:
        """`run(items)` on a lane's thread, with its duration (ms) and the time it ended (time.monotonic())."""
        start = time.monotonic()
        results = run(items)
        finished = time.monotonic()
        return results, (finished - start) * 1e3, finished

    def _drop_abandoned(self) -> None:
        kept = [job for job in self._pending if not job.future.done()]
        self.dropped += len(self._pending) - len(kept)
        self._pending = deque(kept)

    async def _next_batch(self, free_since: float) -> list[_Job]:
        """The next batch for a lane free since `free_since` (its window counts from then at the earliest: the
        robots that lane answered send again a moment after)."""
        while True:
            self._drop_abandoned()
            if not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            head = self._pending[0]  # the oldest waiting request opens the window
            mates = sum(1 for job in self._pending if job.group == head.group)
            remaining = max(head.arrived, free_since) + self.window_s - time.monotonic()
            # every open connection has a request waiting or in a running batch: no other can come
            nobody_else = self.senders is not None and len(self._pending) + self._in_flight() >= self.senders()
            if mates >= self.max_batch or remaining <= 0 or nobody_else:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                pass
        batch, rest = [], deque()
        for job in self._pending:
            if job.group == head.group and len(batch) < self.max_batch:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

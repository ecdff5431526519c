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

Batches run one at a time on one worker thread (the model is one device), so the event loop stays free to
read, decode and answer other connections while a batch runs. The queue is bounded (`max_pending`):
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
    per item, in order; a result that is an Exception is raised in that item's `submit`)."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], *, window_s: float = 0.005,
                 max_batch: int = 8, max_pending: int = 256,
                 group: Callable[[Any], Hashable] = lambda item: None,
                 senders: Callable[[], int] | None = None) -> None:
        """`senders()`: how many clients could have a request in the queue (a server's open connections, each
        with at most one request in flight); None: unknown, every batch waits out its window unless full."""
        if window_s < 0 or max_batch < 1 or max_pending < 1:
            raise ValueError("window_s must be >= 0, max_batch and max_pending >= 1")
        self.run, self.window_s, self.max_batch, self.max_pending = run, window_s, max_batch, max_pending
        self.group, self.senders = group, senders
        self._free_since = 0.0  # monotonic time the last batch ended
        self._pending: deque[_Job] = deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pi05-batch")
        self.batch_sizes: Counter[int] = Counter()
        self.dropped = 0  # requests whose client left before their batch ran

    @property
    def pending(self) -> int:
        """Requests waiting for a batch; one whose client has left stops counting at once (the loop sweeps it out
        of the queue when it next looks, which may be after the running batch)."""
        return sum(1 for job in self._pending if not job.future.done())

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
        for job in self._pending:
            job.future.cancel()
        self._pending.clear()
        # a batch already on the thread finishes; the event loop stays free meanwhile
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    # --- the batching loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            start = time.monotonic()
            try:
                results, run_ms, finished = await loop.run_in_executor(self._executor, self._timed_run,
                                                                       [job.item for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} rows")
            except asyncio.CancelledError:  # close() while this batch ran: its rows' submit() calls end too
                for job in batch:
                    job.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every row of the batch hears of it; the loop goes on
                log.exception("a batch of %d failed", len(batch))
                results, run_ms, finished = [exc] * len(batch), 0.0, 0.0
            self.batch_sizes[len(batch)] += 1
            self._free_since = time.monotonic()
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the client left while its batch ran
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(BatchResult(result, len(batch), (start - job.arrived) * 1e3, run_ms,
                                                      finished))

    def _timed_run(self, items: list[Any]) -> tuple[Sequence[Any], float, float]:
        """`run(items)` on the batch thread, with its duration (ms) and the time it ended (time.monotonic())."""
        start = time.monotonic()
        results = self.run(items)
        finished = time.monotonic()
        return results, (finished - start) * 1e3, finished

    def _drop_abandoned(self) -> None:
        kept = [job for job in self._pending if not job.future.done()]
        self.dropped += len(self._pending) - len(kept)
        self._pending = deque(kept)

    async def _next_batch(self) -> list[_Job]:
        while True:
            self._drop_abandoned()
            if not self._pending:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            head = self._pending[0]  # the oldest waiting request opens the window
            mates = sum(1 for job in self._pending if job.group == head.group)
            remaining = max(head.arrived, self._free_since) + self.window_s - time.monotonic()
            nobody_else = self.senders is not None and len(self._pending) >= self.senders()
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

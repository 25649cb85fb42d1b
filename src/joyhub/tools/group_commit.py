"""Group commit, per process: the writes that arrive while a write is under way go to PostgreSQL
together, as one statement (issue 15).

Every admission and every settle of a subscription updates its one row, and each is a commit that
holds the row's lock until the WAL is flushed: one account's calls queue on that lock, so its
throughput is bounded by commit latency however many cores the hub has; and every statement
costs PostgreSQL the start of a large plan, so separate callers' calls pay it once each. Here,
calls of one key (for admissions, a tool and a line of the process, `AdmitRequest.batch_key`; for
settles, a line of the process, `MeteringStore.settle`) — whichever accounts they bill — that find
a write of that key in progress wait for it and then go in the next write, together: one
statement and one WAL flush for all of them, each with its own usage log, outcome and answer.

No call waits for company: the first of a key is written at once. A batch forms only from calls
that would otherwise have queued on the row lock, so latency at low concurrency is unchanged and
a hot account's throughput grows with its concurrency. The write itself decides each call as if
they had come one by one (`metering.py`), so the accounting guarantees are those of single calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from joyhub.core import metrics

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 64


@dataclass
class _Line(Generic[T, R]):
    waiting: list[tuple[T, asyncio.Future[R]]] = field(default_factory=list)


class GroupCommit(Generic[K, T, R]):
    """`submit(key, item)` → the result `write` gives for it; items of one key are written in
    batches of up to `max_batch`, one batch at a time per key."""

    def __init__(
        self, kind: str, write: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = MAX_BATCH
    ) -> None:
        self._batch_size = metrics.GROUP_COMMIT_BATCH.labels(kind)
        self._write = write
        self._max_batch = max_batch
        self._lines: dict[K, _Line[T, R]] = {}
        self.batches = 0  # written so far (for tests and benchmarks)
        self.items = 0

    async def submit(self, key: K, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        line = self._lines.get(key)
        if line is not None:  # a write of this key is under way: go with the next one
            line.waiting.append((item, future))
            return await future
        line = self._lines[key] = _Line()
        line.waiting.append((item, future))
        # the writer is a task of its own: it outlives this caller's wait if needed, and drains
        # the line for the callers who joined meanwhile
        writer = asyncio.create_task(self._drain(key, line))
        writer.add_done_callback(_retrieve)
        # the future is this caller's alone: a caller cancelled while it waits cancels only its
        # wait (no shield needed, one event-loop turn saved) — its item is written all the same
        return await future

    async def _drain(self, key: K, line: _Line[T, R]) -> None:
        try:
            while line.waiting:
                batch, line.waiting = line.waiting[: self._max_batch], line.waiting[self._max_batch :]
                await self._write_batch(batch)
        finally:
            del self._lines[key]
            for _, future in line.waiting:  # the writer itself was cancelled (shutdown)
                future.cancel()

    async def _write_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self._batch_size.observe(len(batch))
        try:
            results = await self._write([item for item, _ in batch])
        except BaseException as exc:  # every caller of the batch gets its failure
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()

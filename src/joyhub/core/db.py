"""The async engine, the session factory and the request-scoped session dependency.

One session per request and one commit point: `get_session` commits after the endpoint returns
and rolls back on any exception. It is declared with `scope="function"` so the commit happens
*before* the response is sent — a failing commit answers 500, never a false 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import await_
from sqlalchemy.util import queue as sqla_queue

from joyhub.core import metrics
from joyhub.core.config import Settings

log = logging.getLogger("joyhub.db")


class FairAsyncQueue(sqla_queue.QueueCommon[Any]):
    """The pool's idle connections, handed to waiters strictly first come, first served.

    SQLAlchemy's default asyncio queue wraps `asyncio.Queue`, which is not fair: a connection
    given back wakes the oldest waiter, but any request arriving before that waiter runs takes
    the connection instead, and the woken waiter goes back to the *end* of the line. Under
    overload (more requests than connections, e.g. 1,000 clients on a 30-connection pool) most
    requests get a connection at once while a few are overtaken again and again until
    DB_POOL_TIMEOUT, and answer 503 although the average wait is far below the timeout. Here a
    returned connection goes straight to the oldest live waiter, so every wait is about the
    average wait and the timeout is reached only when the pool is truly stuck.
    """

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: deque[Any] = deque()
        self._waiters: deque[asyncio.Future[Any]] = deque()

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # skip waiters that timed out or were cancelled
                waiter.set_result(item)
                return
        if self.full():
            raise sqla_queue.Full()
        self._items.append(item)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)  # the pool only ever returns connections without blocking

    def get_nowait(self) -> Any:
        if not self._items:
            raise sqla_queue.Empty()
        return self._items.pop() if self.use_lifo else self._items.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if self._items or not block:
            return self.get_nowait()
        return await_(self.wait(max_wait=timeout))

    async def wait(self, max_wait: float | None) -> Any:
        """Queue up for the next connection given back; `Empty` after `max_wait` seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(max_wait, _expire, waiter) if max_wait is not None else None
        try:
            return await waiter
        except asyncio.CancelledError:
            if _handed(waiter):
                # handed a connection in the same instant we were cancelled: pass it on
                self.put_nowait(waiter.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not _handed(waiter):
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)


def _handed(waiter: asyncio.Future[Any]) -> bool:
    """True when `put_nowait` gave this waiter a connection."""
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(sqla_queue.Empty())


class FairAsyncQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool with a first-come-first-served wait (`FairAsyncQueue`)."""

    _queue_class = FairAsyncQueue


PING_AFTER_IDLE_SECONDS = 1.0
_CHECKED_IN_AT = "joyhub_checked_in_at"
# set by `connect_retried`: the caller retries its work on a fresh connection if this one is dead
_retried_by_caller: ContextVar[bool] = ContextVar("retried_by_caller", default=False)


def ping_on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pre-ping in one round trip: a connection the server dropped is replaced before use.

    SQLAlchemy's `pool_pre_ping` on asyncpg wraps its ping in a transaction of its own (BEGIN,
    the ping, ROLLBACK: three round trips, for PgBouncer's transaction mode), which on the
    gateway's hot path — two checkouts per invocation — was six of its eleven round trips. This
    is the pessimistic check SQLAlchemy documents for a `checkout` event: raising
    `DisconnectionError` makes the pool discard the connection and check out a fresh one.

    A checkout through `connect_retried` skips the ping when the connection was given back less
    than PING_AFTER_IDLE_SECONDS ago and asyncpg has not seen it close: its caller retries on a
    fresh connection anyway, so the ping would only buy what the retry already guarantees.
    """
    driver = dbapi_connection.driver_connection
    if driver.is_closed():
        raise DisconnectionError("connection closed")
    if _retried_by_caller.get():
        checked_in = record.info.get(_CHECKED_IN_AT)
        if checked_in is not None and time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
            return
    try:
        await_(driver.fetchrow(";"))
    except Exception as exc:
        raise DisconnectionError("connection failed its ping") from exc


def _note_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN_AT] = time.monotonic()


@contextlib.asynccontextmanager
async def connect_retried(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for work its caller retries on a transient failure (the gateway's settle):
    a connection used within the last second is handed out without the pre-ping round trip,
    and one that turns out dead fails the attempt, which the retry makes on a fresh one."""
    conn = await checkout(engine, retried=True)
    try:
        yield conn
    finally:
        await conn.close()


async def checkout(engine: AsyncEngine, *, retried: bool) -> AsyncConnection:
    """A pooled connection; with `retried`, as `connect_retried` hands them out (no pre-ping for
    one used within the last second: the caller retries its work if it turns out dead)."""
    if not retried:
        return await engine.connect().start()
    token = _retried_by_caller.set(True)
    try:
        return await engine.connect().start()
    finally:
        _retried_by_caller.reset(token)


# how long a finished statement's connection waits for the next statement before it goes back
IDLE_RELEASE_SECONDS = 0.002


class Releases:
    """Connections whose statement is done: used again by the next statement, or given back to
    the pool a moment later.

    A checkout and a checkin cost SQLAlchemy's pool some 35 and 40 µs of CPU (a greenlet trip,
    the checkout and checkin events, the reset, the proxy's finalizer), and the pool hands its
    connections out in turn, so consecutive statements ran on different PostgreSQL backends, each
    with cold caches. On the gateway's path that was twice per call, between a statement and the
    caller waiting for its answer. A finished statement's connection is held here instead:

    - the next statement takes it (`take`): no pool round trip at all, and no ping, since it was
      in use a moment ago (its caller retries on a dead connection, as on any taken without one);
      at concurrency 1 an admission, its settle and the next call's admission share one;
    - otherwise it goes back when the next statement is sent (`flush`, while the hub waits for
      that statement's answer) or IDLE_RELEASE_SECONDS after it was held, whichever comes first.

    So no connection is held for more than that moment, whatever the caller does next — a call
    waiting for a slow upstream holds none — and `wait` gives back every one at once (shutdown,
    before the engine is disposed).
    """

    def __init__(self, idle_seconds: float = IDLE_RELEASE_SECONDS) -> None:
        self._idle_seconds = idle_seconds
        self._held: list[AsyncConnection] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def hold(self, conn: AsyncConnection) -> None:
        """Keep `conn` (its statement is done) for the next statement, or until `flush`."""
        self._held.append(conn)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_seconds, self._close_held)

    def take(self) -> AsyncConnection | None:
        """The connection held last, to use again; None when none is held."""
        found = None
        while self._held and found is None:
            conn = self._held.pop()
            sync = conn.sync_connection
            if sync is None or sync.closed or sync.invalidated:
                continue
            driver = sync.connection.driver_connection
            if driver is None or driver.is_closed():  # the server closed it meanwhile
                self._close(conn)  # the pool discards it
                continue
            found = conn
        if not self._held and self._timer is not None:  # the next one held gets its whole moment
            self._timer.cancel()
            self._timer = None
        return found

    def flush(self) -> None:
        """Give back every connection held, one loop turn from now: once the caller, about to send
        a statement, is waiting for its answer."""
        if self._held:
            asyncio.get_running_loop().call_soon(self._close_held)

    def _close_held(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for conn in held:
            self._close(conn)

    def _close(self, conn: AsyncConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None:  # the pool has discarded the connection
            log.warning("giving a connection back failed", extra={"error": type(failure).__name__})

    async def wait(self) -> None:
        """Give back every connection held, now."""
        self._close_held()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# Every session of the hub's pool. The invocation path runs two large statements per call (the
# batched admission and settle, `tools/metering.py`); planned afresh on every execution (custom
# plans, PostgreSQL's default choice for them) they cost about 1.5 + 1 ms of PostgreSQL CPU per
# call, more than running them. Their generic plans, kept by asyncpg's prepared statements, are
# as good (every lookup is by key) once JIT is off: the generic plan's row estimates for the
# request arrays put its cost above `jit_above_cost`, and compiling it took 340 ms per call.
# JIT pays off only for long analytic scans, which the hub never runs (summaries read rollups).
# Measured in BENCHMARKS.md ("Gateway across issues 13-19"): c=1 overhead 7.1 → 4.1 ms,
# 32 callers 300 → 508/s.
SERVER_SETTINGS = {
    "application_name": "joyhub",
    "timezone": "UTC",
    "jit": "off",
    "plan_cache_mode": "force_generic_plan",
}


def make_engine(url: str, settings: Settings, **overrides: Any) -> AsyncEngine:
    """The engine with the seed's pool settings, pre-ping (`ping_on_checkout`), a fair bounded
    wait for a connection (DB_POOL_TIMEOUT, then 503), asyncpg's statement cache, and the pool
    gauges of /metrics kept current by the pool's events (`metrics.track_pool`)."""
    kwargs: dict[str, Any] = {
        "poolclass": FairAsyncQueuePool,
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_recycle": settings.db_pool_recycle,
        "pool_timeout": settings.db_pool_timeout,
        "pool_pre_ping": True,
        "connect_args": {
            "statement_cache_size": 512,
            "timeout": 5,
            "server_settings": SERVER_SETTINGS,
        },
    }
    kwargs.update(overrides)
    pre_ping = kwargs.pop("pool_pre_ping")
    engine = create_async_engine(url, pool_pre_ping=False, **kwargs)
    if pre_ping:
        event.listen(engine.sync_engine.pool, "checkout", ping_on_checkout)
        event.listen(engine.sync_engine.pool, "checkin", _note_checkin)
    metrics.track_pool(engine.sync_engine.pool)  # after the ping: count only checkouts that passed it
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Yield the request's session; commit when the endpoint succeeded, else roll back."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


DbSession = Annotated[AsyncSession, Depends(get_session, scope="function")]


def after_commit(session: AsyncSession, action: Callable[[], None]) -> None:
    """Run `action` once the session's current transaction commits; never if it rolls back.

    For side effects that must follow only a change that stands — a log line saying a password
    was replaced must not be written for a change a failing commit (or a lost race) undid.
    """
    sync = session.sync_session
    settled = False

    def committed(_: Any) -> None:
        nonlocal settled
        if not settled:
            settled = True
            action()

    def rolled_back(_: Any) -> None:
        nonlocal settled
        settled = True

    event.listen(sync, "after_commit", committed, once=True)
    event.listen(sync, "after_rollback", rolled_back, once=True)

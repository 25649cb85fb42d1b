"""The connection pool's wait is first come, first served, bounded, and loses no connection.

Under overload (far more requests than pooled connections) an unfair wait lets newcomers take
connections ahead of requests already waiting, which starve until DB_POOL_TIMEOUT and answer
503 although the average wait is short. `FairAsyncQueue` hands a returned connection straight
to the oldest waiter.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import queue as sqla_queue

from joyhub.core.db import FairAsyncQueue, FairAsyncQueuePool, make_engine
from tests.conftest import test_settings as hub_settings

pytestmark = pytest.mark.integration


async def test_engines_use_the_fair_pool(engine: AsyncEngine) -> None:
    assert isinstance(engine.pool, FairAsyncQueuePool)


async def test_waiters_are_served_in_arrival_order_even_against_a_barging_newcomer(
    database_url: str,
) -> None:
    eng = make_engine(database_url, hub_settings(), pool_size=1, max_overflow=0, pool_timeout=10)
    order: list[str] = []
    try:
        holder = await eng.connect()

        async def waiter(name: str) -> None:
            async with eng.connect() as conn:
                order.append(name)
                await conn.execute(text("SELECT 1"))

        tasks = []
        for name in ("w1", "w2", "w3"):
            tasks.append(asyncio.create_task(waiter(name)))
            await asyncio.sleep(0.02)  # each one queued before the next arrives
        # give the connection back and ask again at once, without yielding in between: with an
        # unfair queue the returning task would take it back ahead of w1
        await holder.close()
        newcomer = await eng.connect()
        order.append("newcomer")
        await newcomer.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await eng.dispose()
    assert order == ["w1", "w2", "w3", "newcomer"]


async def test_the_wait_is_still_bounded_and_a_timed_out_waiter_leaves_the_line(database_url: str) -> None:
    eng = make_engine(database_url, hub_settings(), pool_size=1, max_overflow=0, pool_timeout=0.2)
    try:
        holder: AsyncConnection = await eng.connect()
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        with pytest.raises(PoolTimeout):
            await eng.connect()
        queue = eng.pool._pool  # type: ignore[attr-defined]
        assert isinstance(queue, FairAsyncQueue)
        assert not queue._waiters  # the timed-out waiter did not stay in line
        await holder.close()
        async with eng.connect() as conn:  # the connection went back to the pool, not to a ghost
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert eng.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await eng.dispose()


async def test_a_connection_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    """Cancelled in the very instant it was handed a connection: nothing may leak."""
    q = FairAsyncQueue(maxsize=2)
    first = asyncio.create_task(q.wait(max_wait=5))
    second = asyncio.create_task(q.wait(max_wait=5))
    await asyncio.sleep(0)  # both are waiting, first in line
    q.put_nowait("conn")  # handed to `first` ...
    first.cancel()  # ... which is cancelled before it could run
    assert await asyncio.wait_for(second, 1) == "conn"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_queue_basics() -> None:
    q = FairAsyncQueue(maxsize=1)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put_nowait("a")
    assert q.full() and q.qsize() == 1
    with pytest.raises(sqla_queue.Full):
        q.put("b", False)
    assert q.get(False) == "a"
    with pytest.raises(sqla_queue.Empty):
        q.get_nowait()
    with pytest.raises(sqla_queue.Empty):
        await q.wait(max_wait=0.01)
    assert not q._waiters

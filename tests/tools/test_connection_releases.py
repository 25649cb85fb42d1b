"""A finished statement's connection is used again by the next statement, or goes back to the
pool when the hub next waits, and never stays out for long (`core/db.Releases`): while the next
statement runs, a moment after the last one when nothing follows, and all at once at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.db import IDLE_RELEASE_SECONDS, Releases, make_engine
from joyhub.tools.metering import Admission, MeteringStore, SettleRequest
from tests.conftest import test_settings as hub_settings
from tests.tools.helpers import admit_request, assert_settled, invoke, make_caller, make_tool, tool_version
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


SmallEngine = Callable[..., AsyncEngine]


@pytest.fixture
async def small_engine(database_url: str) -> AsyncIterator[SmallEngine]:
    """`small_engine(pool_size=…)`: an engine of its own with a small pool, disposed at the end."""
    made: list[AsyncEngine] = []

    def make(pool_size: int, **pool: Any) -> AsyncEngine:
        made.append(make_engine(database_url, hub_settings(), pool_size=pool_size, max_overflow=0, **pool))
        return made[-1]

    yield make
    for engine in made:
        await engine.dispose()


def _out(engine: AsyncEngine) -> int:
    """Connections of `engine`'s pool checked out now."""
    checked_out: int = engine.pool.checkedout()  # type: ignore[attr-defined]
    return checked_out


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_held_until_flushed_then_given_back_while_the_caller_waits(small_engine: SmallEngine) -> None:
    engine = small_engine(2)
    releases = Releases(idle_seconds=60)  # no timer in the way: only `flush` gives back
    conn = await engine.connect()
    releases.hold(conn)
    await _turns()
    assert _out(engine) == 1
    releases.flush()
    assert _out(engine) == 1  # not before the caller waits
    await _turns()
    assert _out(engine) == 0
    assert conn.closed


async def test_a_held_connection_goes_back_by_itself_when_nothing_follows(small_engine: SmallEngine) -> None:
    engine = small_engine(2)
    releases = Releases(idle_seconds=0.02)
    first, second = await engine.connect(), await engine.connect()
    releases.hold(first)
    releases.hold(second)
    async with asyncio.timeout(2):
        while _out(engine):
            await asyncio.sleep(0.005)
    assert first.closed and second.closed


async def test_wait_gives_back_every_held_connection_at_once(small_engine: SmallEngine) -> None:
    engine = small_engine(3)
    releases = Releases(idle_seconds=60)
    for _ in range(3):
        releases.hold(await engine.connect())
    await releases.wait()
    assert _out(engine) == 0


async def test_a_checkout_waiting_for_a_held_connection_gets_it(small_engine: SmallEngine) -> None:
    """A pool of one, held by a finished statement: the next statement's flush gives it back while
    that statement waits for a connection (no timeout, no idle timer needed)."""
    engine = small_engine(1, pool_timeout=5)
    releases = Releases(idle_seconds=60)
    releases.hold(await engine.connect())
    releases.flush()
    async with asyncio.timeout(2), engine.connect() as conn:
        assert not conn.closed


async def test_a_held_connection_the_server_closed_is_not_used_again(small_engine: SmallEngine) -> None:
    engine = small_engine(2)
    releases = Releases(idle_seconds=60)
    held = await engine.connect()
    pid = (await held.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
    await held.commit()
    releases.hold(held)
    async with engine.connect() as other:
        await other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
    driver = held.sync_connection.connection.driver_connection  # type: ignore[union-attr]
    async with asyncio.timeout(5):
        while not driver.is_closed():  # asyncpg sees the server hang up
            await asyncio.sleep(0.01)
    assert releases.take() is None
    await releases.wait()
    assert _out(engine) == 0


async def test_after_an_invocation_the_pool_is_whole_again_without_another_request(
    make_client: object, engine: AsyncEngine, upstream: Upstream
) -> None:
    client: httpx.AsyncClient = await make_client(own_engine=True)  # type: ignore[operator]
    pool = client.app.state.engine.pool  # type: ignore[attr-defined]
    tool = await make_tool(engine, upstream.url("/fast?tokens=42"))
    caller = await make_caller(engine, "pro")
    for _ in range(3):
        assert (await invoke(client, caller, tool)).status_code == 200
    async with asyncio.timeout(IDLE_RELEASE_SECONDS + 2):
        while pool.checkedout():
            await asyncio.sleep(0.002)
    await assert_settled(engine, caller)


async def test_the_next_statement_uses_the_connection_the_last_one_finished_with(engine: AsyncEngine) -> None:
    """An admission and the settle right after it: one checkout from the pool, not two."""
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    version = await tool_version(engine, tool)
    caller = await make_caller(engine, "pro")
    store = MeteringStore(engine)
    checkouts: list[object] = []

    def count(dbapi_connection: object, record: object, proxy: object) -> None:
        checkouts.append(dbapi_connection)

    event.listen(engine.sync_engine.pool, "checkout", count)
    try:
        credential = Credential(user_id=caller.user_id, session_id=caller.account.session_id)
        [admitted] = await store.admit_batch([admit_request(tool, version, credential, reserve=10)])
        assert admitted.admission is not None
        settled = await store.settle_many([settle_request(admitted.admission)])
        assert list(settled) == [admitted.admission.log_id]
        assert len(checkouts) == 1
    finally:
        event.remove(engine.sync_engine.pool, "checkout", count)
        await store.releases.wait()
    assert _out(engine) == 0


def settle_request(admission: Admission) -> SettleRequest:
    return SettleRequest(
        admission=admission, status="success", tokens=5, token_source="reported", duration_ms=3,
        error_code=None, now=utcnow(), response_status=200, response_body=b"{}",
    )  # fmt: skip

"""The pool gauges of `/metrics` follow the pool's events, not the scrapes.

`joyhub_db_pool_connections_in_use` and `joyhub_db_pool_size` are "livesum" gauges: with
several workers every process writes its own value and a scrape sums them, so each process must
keep its value current by itself (`metrics.track_pool`). A process with several engines (this
test process has many) reports the sum over its live pools, so every assertion here is about
the change from a baseline, taken once the engines of earlier tests are collected (`settle`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from joyhub.core import metrics
from joyhub.core.config import Settings
from joyhub.core.db import make_engine
from tests.conftest import test_settings as hub_settings
from tests.served_hub import ServedDatabase, hub_process, served_database, wait_ready

pytestmark = pytest.mark.integration

__all__ = ["served_database"]  # the fixture, used by name

IN_USE = "joyhub_db_pool_connections_in_use"
SIZE = "joyhub_db_pool_size"


def gauge(name: str) -> float:
    """This process's value, read from the registry: no scrape, no request."""
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


def settle() -> None:
    """Collect the engines earlier tests let go of, so they leave the sums before a baseline
    is taken rather than in the middle of a test."""
    gc.collect()
    metrics.refresh_pool_gauges()


def scraped(exposition: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", exposition, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def scrape(client: httpx.AsyncClient) -> tuple[float, float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return scraped(r.text, IN_USE), scraped(r.text, SIZE)


async def hold(stack: AsyncExitStack, engine: AsyncEngine, n: int) -> list[AsyncConnection]:
    """Check out `n` connections (each with a round trip, so it really is in use)."""
    held = []
    for _ in range(n):
        conn = await stack.enter_async_context(engine.connect())
        await conn.execute(text("SELECT 1"))
        held.append(conn)
    return held


async def test_metrics_show_the_connections_held_and_then_released(make_client: Any) -> None:
    """Pool of 2 + 2 overflow: three held connections are three in use and one overflow."""
    c: httpx.AsyncClient = await make_client(own_engine=True, db_pool_size=2, db_max_overflow=2)
    engine: AsyncEngine = c.app.state.engine  # type: ignore[attr-defined]
    settle()
    in_use_before, size_before = await scrape(c)

    async with AsyncExitStack() as stack:
        await hold(stack, engine, 3)
        in_use, size = await scrape(c)
        assert in_use - in_use_before == 3
        assert size - size_before == 1  # the configured 2, plus the one overflow connection open

    # back in the pool; the overflow connection is closed as it comes back (the queue is full)
    assert await scrape(c) == (in_use_before, size_before)


async def test_gauges_change_at_each_checkout_without_a_scrape(database_url: str) -> None:
    """Every checkout and checkin writes the gauge at once: no /metrics request anywhere."""
    settle()
    size_before = gauge(SIZE)
    engine = make_engine(database_url, hub_settings(), pool_size=3, max_overflow=1)
    try:
        assert gauge(SIZE) - size_before == 3  # the configured size, before any connection
        base = gauge(IN_USE)
        async with AsyncExitStack() as stack:
            for n in range(1, 5):
                await hold(stack, engine, 1)
                assert gauge(IN_USE) - base == n == engine.pool.checkedout()  # type: ignore[attr-defined]
            assert gauge(SIZE) - size_before == 4  # one overflow connection open
        assert gauge(IN_USE) == base
        assert gauge(SIZE) - size_before == 3
    finally:
        await engine.dispose()


async def test_invalidated_connection_counts_once(database_url: str) -> None:
    """A checked-out connection invalidated by its holder is checked in at once, and closing it
    afterwards checks in nothing more: the gauge returns to its baseline, not below."""
    engine = make_engine(database_url, hub_settings(), pool_size=2, max_overflow=0)
    try:
        settle()
        size_before = gauge(SIZE)
        async with AsyncExitStack() as stack:
            base = gauge(IN_USE)
            conn, _ = await hold(stack, engine, 2)
            assert gauge(IN_USE) - base == 2
            await conn.invalidate()
            assert gauge(IN_USE) - base == 1
        assert gauge(IN_USE) == base
        assert gauge(SIZE) == size_before
        async with engine.connect() as conn:  # the invalidated entry reconnects on demand
            await conn.execute(text("SELECT 1"))
            assert gauge(IN_USE) - base == 1
        assert gauge(IN_USE) == base
    finally:
        await engine.dispose()


async def test_failed_reconnects_never_drive_the_gauge_below_its_baseline(database_url: str) -> None:
    """An invalidated entry reconnects at its next checkout; when that connect fails the pool
    fires `checkin` though no `checkout` came first (the database going away does this): a
    running +1/-1 would drift one lower on every such failure."""
    asyncpg_dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    database_up = True

    async def creator() -> Any:
        if not database_up:
            raise ConnectionRefusedError("the database is down (simulated)")
        return await asyncpg.connect(asyncpg_dsn)

    engine = make_engine(database_url, hub_settings(), pool_size=1, max_overflow=0, async_creator=creator)
    try:
        settle()
        base = gauge(IN_USE)
        async with engine.connect() as conn:
            await conn.invalidate()  # the entry goes back to the pool without a connection
        assert gauge(IN_USE) == base
        database_up = False
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError):
                async with engine.connect():
                    pass
            assert gauge(IN_USE) == base
        database_up = True
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            assert gauge(IN_USE) - base == 1
        assert gauge(IN_USE) == base
    finally:
        await engine.dispose()


async def test_connection_killed_in_the_pool_is_replaced_and_counted_once(
    database_url: str, engine: AsyncEngine
) -> None:
    """A pooled connection the server dropped fails its ping at checkout (`ping_on_checkout`),
    is closed and replaced: one connection in use, one open, as before the kill."""
    own = make_engine(database_url, hub_settings(), pool_size=1, max_overflow=0)
    try:
        settle()
        size_before = gauge(SIZE)
        base = gauge(IN_USE)
        async with own.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        async with own.connect() as conn:
            assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one() != pid
            assert gauge(IN_USE) - base == 1
            assert gauge(SIZE) == size_before
        assert gauge(IN_USE) == base
    finally:
        await own.dispose()


async def test_two_workers_each_report_their_pool_without_being_scraped(
    served_database: ServedDatabase, tmp_path: Path
) -> None:
    """`joyhub serve --workers 2`: one scrape, answered by one worker, sums both workers' pools.
    Set only at scrape time, the other worker's size would still read 0 here."""
    configured = int(os.environ.get("DB_POOL_SIZE", Settings.model_fields["db_pool_size"].default))
    with hub_process(served_database.url, tmp_path, workers=2) as hub:
        await wait_ready(hub)
        async with httpx.AsyncClient(base_url=hub.base_url, timeout=5) as c:
            # `/ready` answered by one worker says nothing of the other, which may still be
            # starting (a busy machine) and whose start-up and background work (the sweep's
            # first pass, the webhook dispatcher's poll) hold a connection for a moment: wait
            # for both to be up and idle, then the sum is exact
            deadline = time.monotonic() + 30
            while True:
                exposition = (await c.get("/metrics")).text
                both_idle = scraped(exposition, SIZE) == 2 * configured and scraped(exposition, IN_USE) == 0
                if both_idle or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert scraped(exposition, SIZE) == 2 * configured, exposition
        assert scraped(exposition, IN_USE) == 0, exposition

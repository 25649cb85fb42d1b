"""Analytics on a real streaming replica (issue 18): routed there when it keeps up, back to the
primary for a user's own recent calls, when it lags past REPLICA_MAX_LAG_SECONDS, and when it is
down. The replica's replay is paused to make it visibly stale: what a request returns then
shows where it read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_engine, make_sessionmaker
from joyhub.core.migrations import migrate_async
from joyhub.main import create_app
from joyhub.ops import lifecycle
from tests.conftest import test_settings as hub_settings
from tests.factories import make_account
from tests.replica.servers import Replicated, replicated_clusters, start_replica
from tests.usage.factories import make_tool, record_invocation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clusters() -> Iterator[Replicated]:
    yield from replicated_clusters()


@pytest.fixture
async def primary(clusters: Replicated) -> AsyncIterator[AsyncEngine]:
    await migrate_async(clusters.primary.url)
    start_replica(clusters)
    eng = make_engine(clusters.primary.url, hub_settings(), pool_size=4, max_overflow=0)
    yield eng
    await eng.dispose()


async def _caught_up(pair: Replicated) -> None:
    """Wait until the replica has received (and, unless paused, replayed) all the primary's WAL:
    a wait for a state, with a deadline — not a timing assertion."""
    p = create_async_engine(pair.primary.url)
    r = create_async_engine(pair.replica.url)
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    async with p.connect() as pc, r.connect() as rc:
                        lsn = (await pc.execute(text("SELECT pg_current_wal_lsn()"))).scalar_one()
                        sql = text(
                            "SELECT pg_last_wal_receive_lsn() >= CAST(:lsn AS pg_lsn) AND"
                            " (pg_is_wal_replay_paused() OR pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn))"
                        )
                        if (await rc.execute(sql, {"lsn": lsn})).scalar_one():
                            return
                except OSError:
                    pass  # the replica is still starting
                await asyncio.sleep(0.05)
    finally:
        await p.dispose()
        await r.dispose()


async def _replay(pair: Replicated, action: str) -> None:
    r = create_async_engine(pair.replica.url, isolation_level="AUTOCOMMIT")
    async with r.connect() as rc:
        await rc.execute(text(f"SELECT pg_wal_replay_{action}()"))
    await r.dispose()


def _reads(target: str, reason: str) -> float:
    labels = {"target": target, "reason": reason}
    return REGISTRY.get_sample_value("joyhub_analytics_reads_total", labels) or 0.0


async def _app(stack: AsyncExitStack, engine: AsyncEngine, pair: Replicated, tmp: Path, lag: float) -> Any:
    settings = hub_settings(
        tmp,
        database_url=pair.primary.url,
        database_replica_url=pair.replica.url,
        replica_max_lag_seconds=lag,
    )
    app = create_app(settings, engine=engine, sessionmaker=make_sessionmaker(engine))
    await stack.enter_async_context(lifecycle.running(app))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub.test")
    stack.push_async_callback(client.aclose)
    return client


async def _history(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    r = await client.get("/api/v1/usage", headers=headers)
    assert r.status_code == 200, r.text
    return len(r.json()["data"])


async def test_routing_lag_rule_own_writes_and_fallback(
    clusters: Replicated, primary: AsyncEngine, tmp_path: Path
) -> None:
    hour_ago = utcnow() - timedelta(hours=1)
    alice = await make_account(primary)
    bob = await make_account(primary)
    tool = await make_tool(primary)
    await record_invocation(primary, alice.user_id, tool, tokens=3, ts=hour_ago)
    await _caught_up(clusters)

    async with AsyncExitStack() as stack:
        patient = await _app(stack, primary, clusters, tmp_path, lag=30)
        strict = await _app(stack, primary, clusters, tmp_path, lag=0.001)

        # caught up: Alice's history is read on the replica
        before = _reads("replica", "replica")
        assert await _history(patient, alice.headers) == 1
        assert _reads("replica", "replica") == before + 1

        # replay paused, a second (old-stamped) call of Alice's written on the primary: the
        # replica within 30 s answers without it — proof the read went there
        await _replay(clusters, "pause")
        await record_invocation(primary, alice.user_id, tool, tokens=4, ts=hour_ago + timedelta(minutes=1))
        await _caught_up(clusters)  # received, not replayed
        assert await _history(patient, alice.headers) == 1

        # the lag rule: past REPLICA_MAX_LAG_SECONDS, the primary answers, complete
        before = _reads("primary", "replica_lagging")
        assert await _history(strict, alice.headers) == 2
        assert _reads("primary", "replica_lagging") == before + 1

        # read-your-writes: Bob's call just now is on the primary only; he sees it at once
        await record_invocation(primary, bob.user_id, tool, tokens=5, ts=utcnow())
        before = _reads("primary", "own_recent_write")
        assert await _history(patient, bob.headers) == 1
        assert _reads("primary", "own_recent_write") == before + 1
        summary = (await patient.get("/api/v1/usage/summary", headers=bob.headers)).json()["data"]
        assert summary["total_invocations"] == 1

        # fallback: the replica stops; the primary answers, complete
        clusters.replica.stop()
        before = _reads("primary", "replica_down")
        assert await _history(patient, alice.headers) == 2
        assert _reads("primary", "replica_down") == before + 1
        stats = await patient.get("/api/v1/usage/timeseries", headers=alice.headers)
        assert stats.status_code == 200


def test_settings_name_the_bad_replica_url() -> None:
    from joyhub.core.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="DATABASE_REPLICA_URL"):
        load_settings(database_replica_url="mysql://nope", jwt_secret_key="x" * 40, _env_file=None)

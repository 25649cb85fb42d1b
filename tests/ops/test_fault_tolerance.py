"""Database trouble answers 503 SERVICE_UNAVAILABLE quickly — never a hang, never a 500 (issue 7).

- an exhausted pool: the wait for a connection is bounded by DB_POOL_TIMEOUT, then 503;
- a dead database (nothing listens on its port): 503 on a DB-backed endpoint;
- connections killed under the pool (what a PostgreSQL restart does to them): `pool_pre_ping`
  replaces them at checkout, so the next request succeeds without an error.

The PostgreSQL-restart-under-load drill is `bench/load/pg_restart.py` (it restarts the system
server, which a test suite must not do).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.db import make_engine, make_sessionmaker
from joyhub.main import create_app
from joyhub.ops import lifecycle
from tests.conftest import test_settings as hub_settings
from tests.factories import make_account

pytestmark = pytest.mark.integration

API = "/api/v1"
# generous bounds: they prove "answers instead of hanging", not a latency target
NO_HANG_SECONDS = 5.0


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["data"] is None
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["meta"]["request_id"]
    assert r.headers.get("Retry-After")
    assert "Traceback" not in r.text and "asyncpg" not in r.text


async def test_exhausted_pool_answers_503_after_the_pool_timeout(
    make_client: Any, engine: AsyncEngine
) -> None:
    account = await make_account(engine)
    c: httpx.AsyncClient = await make_client(
        own_engine=True, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.5
    )
    app_engine: AsyncEngine = c.app.state.engine  # type: ignore[attr-defined]
    ok = await c.get(f"{API}/users/me", headers=account.headers)
    assert ok.status_code == 200

    held = await app_engine.connect()  # the pool's only connection, held by "a stuck request"
    try:
        started = time.monotonic()
        r = await asyncio.wait_for(c.get(f"{API}/users/me", headers=account.headers), NO_HANG_SECONDS)
        elapsed = time.monotonic() - started
        _assert_unavailable(r)
        assert elapsed >= 0.4  # it did wait for a connection, for about DB_POOL_TIMEOUT
        ready = await asyncio.wait_for(c.get("/ready"), NO_HANG_SECONDS)
        assert ready.status_code == 503
        assert (await c.get("/health")).status_code == 200  # liveness needs no connection
    finally:
        await held.close()

    again = await c.get(f"{API}/users/me", headers=account.headers)
    assert again.status_code == 200  # the connection is back: service resumes at once


async def test_exhausted_pool_refuses_an_invocation_without_a_trace(
    make_client: Any, engine: AsyncEngine
) -> None:
    """The gateway's admission needs a connection too: 503 and nothing admitted or charged."""
    from tests.factories import make_subscription

    account = await make_account(engine)
    await make_subscription(engine, account.user_id, "pro")
    c: httpx.AsyncClient = await make_client(
        own_engine=True, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.3
    )
    app_engine: AsyncEngine = c.app.state.engine  # type: ignore[attr-defined]
    held = await app_engine.connect()
    try:
        r = await asyncio.wait_for(
            c.post(
                f"{API}/tools/00000000-0000-4000-8000-000000000001/invoke",
                json={"input": {"text": "hi"}},
                headers=account.headers,
            ),
            NO_HANG_SECONDS,
        )
    finally:
        await held.close()
    _assert_unavailable(r)
    async with engine.connect() as conn:
        logs = (await conn.execute(text("SELECT count(*) FROM usage_logs"))).scalar_one()
        reserved = (
            await conn.execute(text("SELECT tokens_reserved + inflight FROM subscriptions"))
        ).scalar_one()
    assert (logs, reserved) == (0, 0)


async def test_dead_database_answers_503_not_500(tmp_path: Any, engine: AsyncEngine) -> None:
    """The app's engine points at a closed port: DB-backed endpoints say SERVICE_UNAVAILABLE."""
    account = await make_account(engine)  # a valid token; the user row is beyond reach anyway
    settings = hub_settings(tmp_path)
    dead = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/joyhub", settings)
    app = create_app(settings, engine=dead, sessionmaker=make_sessionmaker(dead))
    try:
        async with lifecycle.running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hub.test") as c:
                for method, path, body in [
                    ("GET", f"{API}/users/me", None),
                    ("GET", f"{API}/tools", None),
                    ("GET", f"{API}/usage/summary", None),
                    ("POST", f"{API}/auth/login", {"email": account.email, "password": account.password}),
                ]:
                    r = await asyncio.wait_for(
                        c.request(method, path, json=body, headers=account.headers), NO_HANG_SECONDS
                    )
                    _assert_unavailable(r)
                ready = await c.get("/ready")
                assert ready.status_code == 503
                assert ready.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
                assert (await c.get("/health")).status_code == 200
    finally:
        await dead.dispose()


async def test_too_many_connections_answers_503_not_500(
    tmp_path: Any, engine: AsyncEngine, database_url: str
) -> None:
    """PostgreSQL refusing a new connection for lack of slots (SQLSTATE 53300, which SQLAlchemy
    hands over wrapped in a generic adapter error) is unavailability, not a bug: 503."""
    role = f"joyhub_nolimit_{uuid.uuid4().hex[:8]}"
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER CONNECTION LIMIT 0'))
        await conn.commit()
    settings = hub_settings(tmp_path)
    full = make_engine(
        make_url(database_url).set(username=role).render_as_string(hide_password=False), settings
    )
    app = create_app(settings, engine=full, sessionmaker=make_sessionmaker(full))
    account = await make_account(engine)
    try:
        async with lifecycle.running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hub.test") as c:
                r = await asyncio.wait_for(c.get(f"{API}/users/me", headers=account.headers), NO_HANG_SECONDS)
                _assert_unavailable(r)
    finally:
        await full.dispose()
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
            await conn.commit()


async def test_pool_pre_ping_replaces_connections_killed_by_a_restart(
    make_client: Any, engine: AsyncEngine
) -> None:
    """Server-side termination of every pooled connection (as a PostgreSQL restart does) is
    invisible to the next requests: pre-ping notices the dead connection at checkout and opens
    a fresh one, so nobody gets an error once the server is back."""
    account = await make_account(engine)
    c: httpx.AsyncClient = await make_client(own_engine=True, db_pool_size=4, db_max_overflow=0)
    first = await asyncio.gather(*(c.get(f"{API}/users/me", headers=account.headers) for _ in range(4)))
    assert [r.status_code for r in first] == [200] * 4
    app_engine: AsyncEngine = c.app.state.engine  # type: ignore[attr-defined]
    assert app_engine.pool.checkedin() >= 1  # type: ignore[attr-defined]

    async with engine.connect() as conn:
        killed = (
            await conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        ).scalar_one()
    assert killed >= 1

    after = await asyncio.gather(*(c.get(f"{API}/users/me", headers=account.headers) for _ in range(8)))
    assert [r.status_code for r in after] == [200] * 8

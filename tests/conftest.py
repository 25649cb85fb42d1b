"""Test fixtures: a real PostgreSQL, the real app over ASGI, factories as plain functions.

Isolation: every test starts from empty tables (one TRUNCATE of all tables, plans re-seeded).
We chose this over the joined-transaction/savepoint recipe because the app under test opens
several transactions per request (the gateway's admit and settle) and the tests run requests
truly in parallel, which one shared connection cannot serve.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from joyhub.core.clock import clock
from joyhub.core.config import Settings
from joyhub.core.db import make_engine, make_sessionmaker
from joyhub.core.migrations import migrate_async
from joyhub.main import create_app
from joyhub.models import Base
from tests.db_server import fresh_database_name, server_url, with_database

TEST_SECRET = "test-secret-key-that-is-long-enough-0123456789"


def redis_url() -> str | None:
    """REDIS_URL with a database number of this xdist worker's own, so workers never collide."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    # REDIS_URL's own database number is the base: runs from several checkouts at once can
    # then be given disjoint numbers (redis://…/4 → workers on 5 and 6)
    head, _, tail = url.rpartition("/")
    base = int(tail) if url.count("/") >= 3 and tail.isdigit() else 0
    if url.count("/") < 3 or not tail.isdigit():
        head = url.rstrip("/")
    number = base + 1 + int("".join(ch for ch in worker if ch.isdigit()) or 0)
    return f"{head}/{number}"


def test_settings(tmp_path: Path | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "jwt_secret_key": TEST_SECRET,
        "bcrypt_rounds": 4,
        "data_dir": tmp_path or Path("var/test-data"),
        "log_format": "json",
        "email_backend": "console",
        "redis_url": redis_url(),
        "admin_email": None,
        "admin_password": None,
        "sweep_interval_seconds": 3600,
        # small pools: two xdist workers, each with extra app instances, share one server's
        # max_connections (100 on the embedded server and on a default system PostgreSQL)
        "db_pool_size": 4,
        "db_max_overflow": 6,
        # the webhook dispatcher's background work stays out of other domains' tests (their
        # pool and timing checks); tests/webhooks turns it on for its own apps
        "webhook_dispatch_in_serve": False,
        # the per-client-address limits: every test client is 127.0.0.1; the tests of these
        # limits set their own values
        "password_work_max_per_address": 100_000,
        "register_max_per_address_per_hour": 100_000,
        "password_reset_max_per_address_per_hour": 100_000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def worker_id_str(request: pytest.FixtureRequest) -> str:
    return str(getattr(request.config, "workerinput", {}).get("workerid", "main"))


@pytest.fixture(scope="session")
async def database_url(worker_id_str: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this worker; dropped at the end of the run."""
    admin_url = await asyncio.to_thread(server_url)
    name = fresh_database_name(worker_id_str)
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
        # a test database need not survive a crash of its server: commits stop waiting for
        # the WAL flush (same semantics for every session, only durability is given up)
        await conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    url = with_database(admin_url, name)
    await migrate_async(url)
    yield url
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url, test_settings(), pool_size=10, max_overflow=10)
    yield eng
    await eng.dispose()


_TABLES = [t.name for t in Base.metadata.sorted_tables]
_EMPTY_TABLES = "".join(f"DELETE FROM {name};" for name in reversed(_TABLES))  # noqa: S608 (model names)


@pytest.fixture(autouse=True)
async def _clean_state(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Empty every table (plans back to their defaults), reset the clock and Redis."""
    clock.reset()
    if "engine" in request.fixturenames or "client" in request.fixturenames:
        eng: AsyncEngine = request.getfixturevalue("engine")
        await reset_database(eng)
        await flush_redis()
    yield
    clock.reset()


async def reset_database(eng: AsyncEngine) -> None:
    """Empty every table and seed the default plans — without their rate and concurrency limits
    (API.md §4.1): tests that are not about limits fire requests in parallel freely, and the
    tests of limits set the ones they need (the migration's own defaults are checked in
    tests/core/test_migrations.py)."""
    seed = _default_plans()
    async with eng.begin() as conn:
        # DELETE, children first, in one simple-protocol round trip: on tables a test left
        # nearly empty it costs a few ms, where TRUNCATE (new files for every table and index,
        # their WAL and fsync) cost about 200 ms per test, a third of the suite's time
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute(_EMPTY_TABLES)
        await conn.execute(
            text(
                "INSERT INTO plans (code, name, description, price_cents, currency, token_limit,"
                " period_days, features, rank, is_active, created_at, updated_at) VALUES"
                " (:code, :name, :description, :price_cents, 'USD', :token_limit, 30,"
                " CAST(:features AS jsonb), :rank, true, now(), now())"
            ),
            seed,
        )


def _default_plans() -> list[dict[str, Any]]:
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "migrations" / "versions" / "0002_seed_default_plans.py"
    spec = importlib.util.spec_from_file_location("_seed", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [{**p, "features": json.dumps(p["features"])} for p in mod.DEFAULT_PLANS]


async def flush_redis() -> None:
    url = redis_url()
    if not url:
        return
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return test_settings(tmp_path)


AppFactory = Callable[..., Any]


@pytest.fixture
async def make_client(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Build extra app instances (own settings, same database) and clients for them.

    `await make_client(**settings_overrides)` returns an httpx.AsyncClient whose app has run
    its start-up; every one is shut down at the end of the test.
    """
    from contextlib import AsyncExitStack

    from joyhub.ops import lifecycle

    async with AsyncExitStack() as stack:

        async def factory(*, own_engine: bool = False, **overrides: Any) -> httpx.AsyncClient:
            app_settings = test_settings(tmp_path, **overrides)
            state: dict[str, Any] = {}
            if own_engine:
                eng = make_engine(str(engine.url.render_as_string(hide_password=False)), app_settings)
                stack.push_async_callback(eng.dispose)
                state["engine"] = eng
            else:
                state["engine"] = engine
            state["sessionmaker"] = make_sessionmaker(state["engine"])
            app = create_app(app_settings, **state)
            await stack.enter_async_context(lifecycle.running(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://hub.test", timeout=30
            )
            stack.push_async_callback(client.aclose)
            client.app = app  # type: ignore[attr-defined]
            return client

        yield factory


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> httpx.AsyncClient:
    """The app (test settings) over ASGI, with its lifespan run."""
    c: httpx.AsyncClient = await make_client()
    return c


@pytest.fixture
def app(client: httpx.AsyncClient) -> Any:
    return client.app  # type: ignore[attr-defined]

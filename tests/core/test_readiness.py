"""`/health` touches nothing; `/ready` reports a dead database within 2 s (API.md §8)."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest

from joyhub.core.db import make_engine

pytestmark = pytest.mark.integration

# The probe gives up after 1 s (API.md: never longer than 2 s). A hang would last the driver's
# 5 s connect timeout or forever; the bound below tells the two apart with room for a busy CI box.
HANG_BOUND = 3.0


async def test_ready_ok(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "ready"
    assert data["checks"]["database"] == "ok"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_ready_reports_a_dead_database_quickly(make_client: Any) -> None:
    from tests.conftest import test_settings

    dead = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{_dead_port()}/x", test_settings())
    c: httpx.AsyncClient = await make_client()
    c.app.state.engine = dead  # type: ignore[attr-defined]
    started = time.monotonic()
    r = await c.get("/ready")
    elapsed = time.monotonic() - started
    await dead.dispose()
    assert r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "database" in body["error"]["message"]
    assert elapsed < HANG_BOUND
    health = await c.get("/health")
    assert health.status_code == 200


async def test_blackholed_database_still_answers_within_two_seconds(make_client: Any) -> None:
    """A server that accepts TCP but never speaks must not hang /ready."""
    from tests.conftest import test_settings

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        hung = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x", test_settings())
        c: httpx.AsyncClient = await make_client()
        c.app.state.engine = hung  # type: ignore[attr-defined]
        started = time.monotonic()
        r = await c.get("/ready")
        elapsed = time.monotonic() - started
        await hung.dispose()
    assert r.status_code == 503
    assert elapsed < HANG_BOUND

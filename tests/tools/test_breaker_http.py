"""The circuit breaker seen over HTTP: open, fast-fail, one trial, close, reopen, admin reset."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import make_admin
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

RECOVERY = 1.0


async def _set_endpoint(engine: AsyncEngine, tool: Any, url: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE tools SET api_endpoint = :u, updated_at = now() WHERE id = :id"),
            {"u": url, "id": tool},
        )


async def test_open_fast_fail_half_open_close_reopen(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    client: httpx.AsyncClient = await make_client(
        circuit_failure_threshold=2, circuit_recovery_seconds=RECOVERY
    )
    admin = await make_admin(engine)
    bad = "/flap?key=dead&fail=999"
    tool = await make_tool(engine, upstream.url(bad), max_attempts=1)
    caller = await make_caller(engine, "pro")

    # two failed attempts open the circuit
    assert (await invoke(client, caller, tool)).status_code == 503
    r = await invoke(client, caller, tool)
    assert r.status_code == 503
    assert "Retry-After" in r.headers  # the call that opened it says when to come back
    assert upstream.count(bad) == 2
    view = (await client.get(f"/api/v1/admin/tools/{tool}", headers=admin.headers)).json()["data"]["circuit"]
    assert view["state"] == "open"
    assert view["consecutive_failures"] == 2
    assert view["opened_until"] is not None

    # open: fast fail, no upstream call, nothing logged
    logs_before = len(await usage_logs(engine, caller.user_id))
    r = await invoke(client, caller, tool)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert int(r.headers["Retry-After"]) >= 1
    assert upstream.count(bad) == 2
    assert len(await usage_logs(engine, caller.user_id)) == logs_before

    # half-open: exactly one trial among parallel callers (different users, so they are not
    # queued behind one another on a subscription row); the trial fails -> reopened
    others = [await make_caller(engine, "pro") for _ in range(8)]
    await asyncio.sleep(RECOVERY + 0.1)
    slow_bad = "/flap?key=dead2&fail=999&code=500"
    await _set_endpoint(engine, tool, upstream.url(slow_bad))
    responses = await asyncio.gather(*(invoke(client, who, tool) for who in others))
    assert all(r.status_code == 503 for r in responses)
    assert upstream.count(slow_bad) == 1
    view = (await client.get(f"/api/v1/admin/tools/{tool}", headers=admin.headers)).json()["data"]["circuit"]
    assert view["state"] == "open"

    # half-open again: the one trial succeeds -> closed, others during the trial failed fast
    await asyncio.sleep(RECOVERY + 0.1)
    good = "/slow?delay=0.5"
    await _set_endpoint(engine, tool, upstream.url(good))
    responses = await asyncio.gather(*(invoke(client, who, tool) for who in others))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 1
    assert statuses.count(503) == 7
    assert upstream.count(good) == 1
    view = (await client.get(f"/api/v1/admin/tools/{tool}", headers=admin.headers)).json()["data"]["circuit"]
    assert view == {"state": "closed", "consecutive_failures": 0, "opened_until": None}
    responses = await asyncio.gather(*(invoke(client, who, tool) for who in others[:5]))
    assert all(r.status_code == 200 for r in responses)
    for who in (caller, *others):
        await assert_settled(engine, who)


async def test_retries_stop_when_the_circuit_opens(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    client = await make_client(circuit_failure_threshold=2, circuit_recovery_seconds=30)
    target = "/flap?key=stop&fail=999"
    tool = await make_tool(engine, upstream.url(target), max_attempts=5)
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool)
    assert r.status_code == 503
    assert upstream.count(target) == 2  # not 5: the second failure opened the circuit
    assert "Retry-After" in r.headers


async def test_upstream_4xx_does_not_count_against_the_circuit(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    client = await make_client(circuit_failure_threshold=2, circuit_recovery_seconds=30)
    tool = await make_tool(engine, upstream.url("/status?code=404"), max_attempts=1)
    caller = await make_caller(engine, "pro")
    for _ in range(4):
        assert (await invoke(client, caller, tool)).status_code == 422
    assert upstream.count("/status?code=404") == 4


async def test_admin_reset_closes_the_circuit(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    client = await make_client(circuit_failure_threshold=1, circuit_recovery_seconds=300)
    admin = await make_admin(engine)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/flap?key=r&fail=1"), max_attempts=1)
    assert (await invoke(client, caller, tool)).status_code == 503
    assert (await invoke(client, caller, tool)).status_code == 503
    assert upstream.count("/flap?key=r&fail=1") == 1
    r = await client.post(f"/api/v1/admin/tools/{tool}/circuit/reset", headers=admin.headers)
    assert r.status_code == 200
    assert r.json()["data"]["circuit"] == {"state": "closed", "consecutive_failures": 0, "opened_until": None}
    assert (await invoke(client, caller, tool)).status_code == 200
    async with engine.connect() as conn:
        changes = (
            await conn.execute(
                text("SELECT changes FROM audit_logs WHERE action = 'tool.circuit_reset' AND target_id = :t"),
                {"t": str(tool)},
            )
        ).scalar_one()
    assert changes["circuit"]["before"]["state"] == "open"
    assert changes["circuit"]["after"]["state"] == "closed"


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="REDIS_URL not set")
async def test_circuit_is_shared_across_instances_with_redis(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    first = await make_client(own_engine=True, circuit_failure_threshold=2, circuit_recovery_seconds=RECOVERY)
    second = await make_client(
        own_engine=True, circuit_failure_threshold=2, circuit_recovery_seconds=RECOVERY
    )
    caller = await make_caller(engine, "pro")
    bad = "/flap?key=shared&fail=999"
    tool = await make_tool(engine, upstream.url(bad), max_attempts=1)
    assert (await invoke(first, caller, tool)).status_code == 503
    assert (await invoke(second, caller, tool)).status_code == 503  # second failure, other instance
    # open on both: neither calls the upstream
    assert (await invoke(first, caller, tool)).status_code == 503
    assert (await invoke(second, caller, tool)).status_code == 503
    assert upstream.count(bad) == 2
    # half-open: one trial across both instances (callers of different users, in parallel)
    others = [await make_caller(engine, "pro") for _ in range(8)]
    await asyncio.sleep(RECOVERY + 0.1)
    good = "/slow?delay=0.5"
    await _set_endpoint(engine, tool, upstream.url(good))
    responses = await asyncio.gather(
        *(invoke(first if i % 2 else second, who, tool) for i, who in enumerate(others))
    )
    assert sorted(r.status_code for r in responses).count(200) == 1
    assert upstream.count(good) == 1
    assert (await invoke(first, caller, tool)).status_code == 200
    assert (await invoke(second, caller, tool)).status_code == 200
    for who in (caller, *others):
        await assert_settled(engine, who)

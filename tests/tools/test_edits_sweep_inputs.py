"""Tool edits apply on the next call everywhere; the stale sweep; bad invoke input is 422."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.models import IdempotencyRecord, UsageLog
from joyhub.ops.sweeper import sweep_once
from tests import conftest
from tests.factories import make_admin
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, sub_state, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def test_patch_applies_to_the_next_call_on_every_instance(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    one = await make_client(own_engine=True)
    two = await make_client(own_engine=True)
    admin = await make_admin(engine)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast?tokens=1"))
    for c in (one, two):
        assert (await invoke(c, caller, tool, {"text": "hello"})).json()["data"]["tokens_used"] == 1

    # endpoint change, made through one instance, used by both at once
    r = await one.patch(
        f"/api/v1/admin/tools/{tool}",
        json={"api_endpoint": upstream.url("/fast?tokens=2")},
        headers=admin.headers,
    )
    assert r.status_code == 200
    for c in (two, one):
        assert (await invoke(c, caller, tool, {"text": "hello"})).json()["data"]["tokens_used"] == 2

    # a new input schema applies at once (validators are cached per tool version)
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 3}}}
    r = await two.patch(f"/api/v1/admin/tools/{tool}", json={"input_schema": schema}, headers=admin.headers)
    assert r.status_code == 200
    for c in (one, two):
        r = await invoke(c, caller, tool, {"text": "hello"})
        assert r.json()["error"]["code"] == "TOOL_INPUT_INVALID"

    # a higher minimum plan, then deactivation
    await one.patch(
        f"/api/v1/admin/tools/{tool}",
        json={"min_plan": "enterprise", "input_schema": None},
        headers=admin.headers,
    )
    for c in (one, two):
        assert (await invoke(c, caller, tool)).json()["error"]["code"] == "PLAN_UPGRADE_REQUIRED"
    await two.patch(f"/api/v1/admin/tools/{tool}", json={"is_active": False}, headers=admin.headers)
    for c in (one, two):
        assert (await invoke(c, caller, tool)).status_code == 404
    await assert_settled(engine, caller)


async def _abandon(
    engine: AsyncEngine, caller: Any, tool: uuid.UUID, age: timedelta, key: str | None
) -> uuid.UUID:
    """A call admitted by a worker that then died: pending log, reservation, claimed key."""
    log_id = uuid.uuid4()
    started = utcnow() - age
    async with make_sessionmaker(engine)() as db, db.begin():
        await db.execute(
            text(
                "UPDATE subscriptions SET tokens_reserved = tokens_reserved + 5, inflight = inflight + 1"
                " WHERE id = :s"
            ),
            {"s": caller.subscription_id},
        )
        db.add(
            UsageLog(
                id=log_id,
                user_id=caller.user_id,
                tool_id=tool,
                subscription_id=caller.subscription_id,
                plan_code="pro",
                status="pending",
                started_at=started,
                timestamp=started,
                tokens_used=0,
                tokens_reserved=5,
            )
        )
        await db.flush()
        if key:
            db.add(
                IdempotencyRecord(
                    id=uuid.uuid4(),
                    user_id=caller.user_id,
                    key=key,
                    request_hash=b"x" * 32,
                    tool_id=tool,
                    usage_log_id=log_id,
                    state="in_flight",
                    created_at=started,
                    expires_at=started + timedelta(hours=24),
                )
            )
    return log_id


async def test_sweep_closes_abandoned_calls_and_releases_them(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"), timeout_seconds=30, max_attempts=3)
    old = await _abandon(engine, caller, tool, timedelta(minutes=11), key="stuck")
    fresh = await _abandon(engine, caller, tool, timedelta(minutes=2), key=None)
    settings = conftest.test_settings(stale_invocation_seconds=600)
    results = await sweep_once(make_sessionmaker(engine), settings)
    assert results["stale_invocations"] == 1
    logs = {log.id: log for log in await usage_logs(engine, caller.user_id)}
    assert (logs[old].status, logs[old].error_code, logs[old].tokens_used) == ("error", "ABANDONED", 0)
    assert logs[fresh].status == "pending"
    state = await sub_state(engine, caller.user_id)
    assert (state.tokens_reserved, state.inflight, state.tokens_used) == (5, 1, 0)
    # the key the dead call held is free again: a retry runs
    r = await invoke(client, caller, tool, key="stuck")
    assert r.status_code == 200
    # a second pass finds nothing new
    assert (await sweep_once(make_sessionmaker(engine), settings))["stale_invocations"] == 0


async def test_sweep_waits_for_the_tools_worst_case(engine: AsyncEngine, upstream: Upstream) -> None:
    caller = await make_caller(engine, "pro")
    slow_tool = await make_tool(engine, upstream.url("/fast"), timeout_seconds=300, max_attempts=5)
    await _abandon(engine, caller, slow_tool, timedelta(minutes=15), key=None)
    settings = conftest.test_settings(stale_invocation_seconds=600)
    # 15 min > STALE_INVOCATION_SECONDS, but the call may legitimately run 5 x 300 s
    assert (await sweep_once(make_sessionmaker(engine), settings))["stale_invocations"] == 0


async def test_sweep_deletes_expired_idempotency_keys(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    assert (await invoke(client, caller, tool, key="a")).status_code == 200
    assert (await invoke(client, caller, tool, key="b")).status_code == 200
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE idempotency_keys SET expires_at = :t WHERE key = 'a'"),
            {"t": utcnow() - timedelta(seconds=1)},
        )
    results = await sweep_once(make_sessionmaker(engine), conftest.test_settings())
    assert results["expired_idempotency_keys"] == 1
    async with engine.connect() as conn:
        keys = (await conn.execute(text("SELECT key FROM idempotency_keys"))).scalars().all()
    assert keys == ["b"]


@pytest.mark.parametrize(
    "body",
    [
        {"input": "not an object"},
        {"input": [1, 2]},
        {"input": None},
        {},
        {"input": {}, "extra": 1},
        {"input": {"text": "nul\x00byte"}},
        {"input": {"k\x00": "v"}},
    ],
)
async def test_bad_invoke_bodies_are_422(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, body: dict[str, Any]
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    r = await client.post(f"/api/v1/tools/{tool}/invoke", json=body, headers=caller.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_ERROR"), r.text
    assert upstream.total == 0
    assert await usage_logs(engine, caller.user_id) == []


async def test_special_invoke_bodies_never_500(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    url = f"/api/v1/tools/{tool}/invoke"
    for raw, expected in (
        (b'{"input": {"x": NaN}}', 422),
        (b'{"input": {"x": "\\ud800"}}', 422),
        (b'{"input": {"x": 1e999}}', 422),
        (b'{"input": ', 400),
        (b'{"input": {"x": "' + b"y" * (1024 * 1024) + b'"}}', 413),
    ):
        r = await client.post(
            url, content=raw, headers={**caller.headers, "Content-Type": "application/json"}
        )
        assert r.status_code == expected, (raw[:40], r.text[:200])
    r = await client.post(f"/api/v1/tools/{uuid.uuid4()}x/invoke", json={"input": {}}, headers=caller.headers)
    assert r.status_code == 422
    # a large but acceptable input goes through, and is charged by the upstream's count
    r = await invoke(client, caller, tool, {"text": "z" * 500_000})
    assert r.status_code == 200
    assert r.json()["data"]["tokens_used"] == 7
    await assert_settled(engine, caller)

"""Invocation happy path and the order of checks (API.md §5): every refusal touches nothing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import IDLE_RELEASE_SECONDS
from tests.tools.helpers import (
    assert_settled,
    assert_untouched,
    invoke,
    make_caller,
    make_tool,
    sub_state,
    usage_logs,
)
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 20}},
    "required": ["text"],
    "additionalProperties": False,
}


async def test_success_charges_reported_tokens_and_logs_once(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast?tokens=42"))
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool, {"text": "hello"}, headers={"X-Request-ID": "req-abc.1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    data = body["data"]
    assert data["status"] == "success"
    assert data["tool_id"] == str(tool)
    assert data["tokens_used"] == 42
    assert data["output"] == {"echo": {"text": "hello"}, "usage": {"total_tokens": 42}}
    assert isinstance(data["duration_ms"], int)
    assert body["meta"]["request_id"] == "req-abc.1"
    assert r.headers["X-Quota-Limit"] == "50000"
    assert r.headers["X-Quota-Remaining"] == str(50000 - 42)
    reset = datetime.fromisoformat(r.headers["X-Quota-Reset"])
    assert r.headers["X-Quota-Reset"].endswith("Z") and reset.utcoffset() == timedelta(0)
    logs = await usage_logs(engine, caller.user_id)
    assert len(logs) == 1
    assert str(logs[0].id) == data["invocation_id"]
    assert (logs[0].status, logs[0].tokens_used, logs[0].request_id) == ("success", 42, "req-abc.1")
    assert logs[0].duration_ms is not None
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used == 42
    await assert_settled(engine, caller)
    assert upstream.count("/fast?tokens=42") == 1


async def test_top_level_tokens_used_and_estimate(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    t1 = await make_tool(engine, upstream.url("/tokens_used?n=5"))
    r = await invoke(client, caller, t1)
    assert r.json()["data"]["tokens_used"] == 5
    t2 = await make_tool(engine, upstream.url("/no_usage?size=100"))
    value = {"text": "hello"}
    r = await invoke(client, caller, t2, value)
    input_bytes = len(b'{"text":"hello"}')
    output_bytes = len(b'{"text": "' + b"x" * 100 + b'"}')
    assert r.json()["data"]["tokens_used"] == -(-(input_bytes + output_bytes) // 4)
    await assert_settled(engine, caller)


async def test_order_of_checks_each_refusal_touches_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    endpoint = upstream.url("/fast")
    # unauthenticated
    tool = await make_tool(engine, endpoint, input_schema=SCHEMA, min_plan_code="pro")
    r = await client.post(f"/api/v1/tools/{tool}/invoke", json={"input": {"text": "x"}})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "NOT_AUTHENTICATED")

    # unknown / inactive / deleted tool -> 404, even without a subscription
    nosub = await make_caller(engine, None)
    for missing in (
        uuid.uuid4(),
        await make_tool(engine, endpoint, is_active=False),
        await make_tool(engine, endpoint, deleted_at=utcnow()),
    ):
        r = await invoke(client, nosub, missing, {"text": "x"})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "NOT_FOUND")

    # no subscription -> 402 SUBSCRIPTION_REQUIRED (before plan, quota, input)
    r = await invoke(client, nosub, tool, {"wrong": 1})
    assert (r.status_code, r.json()["error"]["code"]) == (402, "SUBSCRIPTION_REQUIRED")
    assert "X-Quota-Limit" not in r.headers

    # cancelled subscription -> 402 as well
    cancelled = await make_caller(engine, "enterprise", status="cancelled")
    r = await invoke(client, cancelled, tool, {"text": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (402, "SUBSCRIPTION_REQUIRED")

    # plan too low -> 402 PLAN_UPGRADE_REQUIRED (before quota and input), quota headers present
    free_empty = await make_caller(engine, "free", tokens_used=1000)
    r = await invoke(client, free_empty, tool, {"wrong": 1})
    assert (r.status_code, r.json()["error"]["code"]) == (402, "PLAN_UPGRADE_REQUIRED")
    assert r.headers["X-Quota-Limit"] == "1000"
    assert r.headers["X-Quota-Remaining"] == "0"

    # quota used up -> 429 (before input validation), details carry the numbers
    pro_empty = await make_caller(engine, "pro", tokens_used=50_000)
    r = await invoke(client, pro_empty, tool, {"wrong": 1})
    assert (r.status_code, r.json()["error"]["code"]) == (429, "QUOTA_EXCEEDED")
    detail = r.json()["error"]["details"][0]
    assert detail["token_limit"] == 50_000
    assert detail["tokens_used"] == 50_000
    assert detail["period_end"].endswith("Z")
    assert r.headers["X-Quota-Remaining"] == "0"

    # input invalid -> 422 TOOL_INPUT_INVALID with details (before the circuit)
    pro = await make_caller(engine, "pro")
    r = await invoke(client, pro, tool, {"text": 5, "extra": True})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert "body.input.text" in fields
    assert r.headers["X-Quota-Limit"] == "50000"

    assert upstream.total == 0
    for who, used in ((nosub, 0), (cancelled, 0), (free_empty, 1000), (pro_empty, 50_000), (pro, 0)):
        await assert_untouched(engine, who, used)


async def test_circuit_open_refusal_comes_after_input_validation(
    make_client: object, engine: AsyncEngine, upstream: Upstream
) -> None:
    client: httpx.AsyncClient = await make_client(  # type: ignore[operator]
        circuit_failure_threshold=1, circuit_recovery_seconds=60
    )
    tool = await make_tool(engine, upstream.url("/status?code=500"), input_schema=SCHEMA, max_attempts=1)
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool, {"text": "x"})
    assert r.status_code == 503
    assert upstream.total == 1
    # invalid input still answers 422 while the circuit is open
    r = await invoke(client, caller, tool, {"text": 1})
    assert r.json()["error"]["code"] == "TOOL_INPUT_INVALID"
    # valid input: fast fail, Retry-After, no upstream call, nothing logged or reserved
    r = await invoke(client, caller, tool, {"text": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["X-Quota-Limit"] == "50000"
    assert upstream.total == 1
    logs = await usage_logs(engine, caller.user_id)
    assert [log.status for log in logs] == ["error"]
    await assert_settled(engine, caller)


async def test_failures_cost_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    cases = {
        "/status?code=400&msg=nope": (422, "TOOL_INPUT_INVALID", "error"),
        "/nonjson": (502, "TOOL_BAD_RESPONSE", "error"),
        "/flap?key=always&fail=99": (503, "TOOL_UNAVAILABLE", "error"),
        "/slow?delay=3": (504, "TOOL_TIMEOUT", "timeout"),
    }
    for target, (status, code, log_status) in cases.items():
        tool = await make_tool(engine, upstream.url(target), timeout_seconds=1, max_attempts=2)
        r = await invoke(client, caller, tool)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), target
        assert r.json()["data"] is None
        detail = r.json()["error"]["details"][0]
        logs = await usage_logs(engine, caller.user_id)
        assert str(logs[-1].id) == detail["invocation_id"]
        assert (logs[-1].status, logs[-1].tokens_used, logs[-1].error_code) == (log_status, 0, code)
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used == 0
    await assert_settled(engine, caller)


async def test_usage_history_keeps_deleted_tool_name(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    from tests.factories import make_admin

    admin = await make_admin(engine)
    tool = await make_tool(engine, upstream.url("/fast"), name="Soon Gone")
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool)).status_code == 200
    r = await client.delete(f"/api/v1/admin/tools/{tool}", headers=admin.headers)
    assert r.status_code == 204
    assert (await invoke(client, caller, tool)).status_code == 404
    async with engine.connect() as conn:
        names = (
            (
                await conn.execute(
                    text(
                        "SELECT t.name FROM usage_logs u JOIN tools t ON t.id = u.tool_id"
                        " WHERE u.user_id = :u"
                    ),
                    {"u": caller.user_id},
                )
            )
            .scalars()
            .all()
        )
    assert names == ["Soon Gone"]


async def test_invocations_show_in_metrics(
    make_client: object, engine: AsyncEngine, upstream: Upstream
) -> None:
    client: httpx.AsyncClient = await make_client(  # type: ignore[operator]
        circuit_failure_threshold=1, circuit_recovery_seconds=60
    )
    good = await make_tool(engine, upstream.url("/fast"))
    bad = await make_tool(engine, upstream.url("/status?code=503"), max_attempts=1)
    caller = await make_caller(engine, "pro")
    empty = await make_caller(engine, "free", tokens_used=1000)
    assert (await invoke(client, caller, good)).status_code == 200
    assert (await invoke(client, caller, bad)).status_code == 503
    assert (await invoke(client, caller, bad)).status_code == 503  # circuit open now
    assert (await invoke(client, empty, good)).status_code == 429
    text_out = (await client.get("/metrics")).text
    assert f'joyhub_tool_invocations_total{{outcome="success",tool="{good}"}}' in text_out
    assert f'joyhub_tool_invocations_total{{outcome="unavailable",tool="{bad}"}}' in text_out
    assert f'joyhub_tool_invocations_total{{outcome="circuit_open",tool="{bad}"}}' in text_out
    assert f'joyhub_circuit_state{{tool="{bad}"}} 2.0' in text_out
    assert 'joyhub_quota_denials_total{plan="free"}' in text_out
    assert f'joyhub_upstream_duration_seconds_count{{tool="{good}"}}' in text_out


async def test_no_pooled_connection_is_held_during_the_upstream_call(
    make_client: object, engine: AsyncEngine, upstream: Upstream
) -> None:
    client: httpx.AsyncClient = await make_client(own_engine=True)  # type: ignore[operator]
    pool = client.app.state.engine.pool  # type: ignore[attr-defined]
    tool = await make_tool(engine, upstream.url("/slow?delay=0.5"))
    caller = await make_caller(engine, "pro")
    call = asyncio.create_task(invoke(client, caller, tool))
    while upstream.count("/slow?delay=0.5") == 0:
        await asyncio.sleep(0.01)
    # the upstream is being called; no connection or transaction held — past the moment for which
    # a finished statement's connection waits to be used again (`db.Releases`), whatever the call
    async with asyncio.timeout(IDLE_RELEASE_SECONDS + 0.2):
        while pool.checkedout():
            await asyncio.sleep(0.001)
    assert not call.done()  # still waiting for its upstream
    assert (await sub_state(engine, caller.user_id)).inflight == 1  # but the admission is committed
    assert (await call).status_code == 200
    await assert_settled(engine, caller)


async def test_client_disconnect_mid_call_still_settles_exactly_once(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/slow?delay=0.3&tokens=17"))
    caller = await make_caller(engine, "pro")
    call = asyncio.create_task(invoke(client, caller, tool, key="hang-up"))
    while upstream.count("/slow?delay=0.3&tokens=17") == 0:
        await asyncio.sleep(0.01)
    call.cancel()  # the client goes away while the upstream is working
    with contextlib.suppress(asyncio.CancelledError):
        await call
    for _ in range(100):
        logs = await usage_logs(engine, caller.user_id)
        if logs and logs[0].status != "pending":
            break
        await asyncio.sleep(0.05)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", 17)]
    assert (await sub_state(engine, caller.user_id)).tokens_used == 17
    await assert_settled(engine, caller)
    # the retry with the same key gets the response the client missed
    r = await invoke(client, caller, tool, key="hang-up")
    assert r.status_code == 200
    assert r.json()["data"]["tokens_used"] == 17
    assert upstream.count("/slow?delay=0.3&tokens=17") == 1


async def test_not_found_carries_quota_headers_for_subscribers(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, uuid.uuid4())
    assert r.status_code == 404
    assert r.headers["X-Quota-Limit"] == "50000"

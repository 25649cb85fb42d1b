"""Accounting under concurrency (API.md §5, guarantees 1-3), on one and on two app instances."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, sub_state, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

LIMIT = 1000
COST = 10
CALLS = 150


async def _fire(clients: list[httpx.AsyncClient], caller: Any, tool: Any) -> list[httpx.Response]:
    return list(
        await asyncio.gather(
            *(invoke(clients[i % len(clients)], caller, tool, {"i": i}) for i in range(CALLS))
        )
    )


async def _check_edge(engine: AsyncEngine, caller: Any, responses: list[httpx.Response]) -> None:
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    successes = statuses.count(200)
    refused = statuses.count(429)
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "QUOTA_EXCEEDED"
    logs = await usage_logs(engine, caller.user_id)
    # every admitted call is logged exactly once, and only admitted calls are
    assert len(logs) == successes
    assert len({log.id for log in logs}) == len(logs)
    assert {str(log.id) for log in logs} == {
        r.json()["data"]["invocation_id"] for r in responses if r.status_code == 200
    }
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used == sum(log.tokens_used for log in logs) == successes * COST
    # the limit is reached; the overshoot is bounded by the calls in flight at the edge
    assert successes >= LIMIT // COST
    assert successes <= LIMIT // COST + CALLS
    assert state.tokens_used >= LIMIT
    assert refused == CALLS - successes
    await assert_settled(engine, caller)


async def test_quota_edge_with_parallel_calls(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url(f"/slow?delay=0.01&tokens={COST}"))
    caller = await make_caller(engine, "free")  # 1,000 tokens
    responses = await _fire([client], caller, tool)
    await _check_edge(engine, caller, responses)
    # reservations make the overshoot small: at most one reservation per call in flight
    successes = [r.status_code for r in responses].count(200)
    assert successes * COST - LIMIT < CALLS * COST


async def test_quota_edge_across_two_instances(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    first = await make_client(own_engine=True)
    second = await make_client(own_engine=True)
    tool = await make_tool(engine, upstream.url(f"/slow?delay=0.01&tokens={COST}"))
    caller = await make_caller(engine, "free")
    responses = await _fire([first, second], caller, tool)
    await _check_edge(engine, caller, responses)


async def test_quota_edge_when_calls_fail_nothing_is_charged(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/status?code=400"))
    caller = await make_caller(engine, "free", tokens_used=990)
    responses = await asyncio.gather(*(invoke(client, caller, tool, {"i": i}) for i in range(30)))
    # in-flight reservations may refuse some at the edge; failures never charge
    assert {r.status_code for r in responses} <= {422, 429}
    assert any(r.status_code == 422 for r in responses)
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used == 990
    await assert_settled(engine, caller, baseline=990)


async def test_two_users_do_not_share_quota(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url(f"/fast?tokens={COST}"))
    a = await make_caller(engine, "free", tokens_used=995)
    b = await make_caller(engine, "free")
    ra = await asyncio.gather(*(invoke(client, a, tool, {"i": i}) for i in range(10)))
    rb = await asyncio.gather(*(invoke(client, b, tool, {"i": i}) for i in range(10)))
    assert [r.status_code for r in rb].count(200) == 10
    assert 1 <= [r.status_code for r in ra].count(200) < 10
    await assert_settled(engine, a, baseline=995)
    await assert_settled(engine, b)


async def test_plan_limit_edit_applies_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url(f"/fast?tokens={COST}"))
    caller = await make_caller(engine, "free", tokens_used=999)
    assert (await invoke(client, caller, tool)).status_code == 200
    assert (await invoke(client, caller, tool)).status_code == 429
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE plans SET token_limit = 5000 WHERE code = 'free'"))
    r = await invoke(client, caller, tool)
    assert r.status_code == 200
    assert r.headers["X-Quota-Limit"] == "5000"
    await assert_settled(engine, caller, baseline=999)

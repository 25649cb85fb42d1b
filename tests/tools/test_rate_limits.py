"""Rate and concurrency limits (API.md §4.1), exact across instances: per plan, per API key, per
tool, and calls running at once. Time is the hub's clock (`core/clock.py`), moved by the tests,
so the GCRA's arithmetic is checked to the second without sleeping."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core import metrics
from joyhub.core.clock import clock
from tests.tools.helpers import (
    API,
    Caller,
    assert_settled,
    assert_untouched,
    invoke,
    make_caller,
    make_tool,
    run_sql,
    usage_logs,
)
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def set_plan(engine: AsyncEngine, code: str, rpm: int | None, concurrent: int | None = None) -> None:
    await run_sql(
        engine,
        "UPDATE plans SET requests_per_minute = :rpm, max_concurrent = :c WHERE code = :code",
        rpm=rpm,
        c=concurrent,
        code=code,
    )


async def _daily_refusals(engine: AsyncEngine, caller: Caller) -> tuple[int, int]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT COALESCE(SUM(rate_limited), 0),"
                    " (SELECT COALESCE(SUM(rate_limited), 0) FROM usage_platform_daily)"
                    " FROM usage_daily WHERE user_id = :u"
                ),
                {"u": caller.user_id},
            )
        ).one()
    return int(row[0]), int(row[1])


def _limited(r: httpx.Response, scope: str) -> int:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "RATE_LIMITED"
    assert (error["details"][0]["scope"], error["details"][0]["limit"]) == (
        scope,
        error["details"][0]["limit"],
    )
    assert error["details"][0]["scope"] == scope
    return int(r.headers["Retry-After"])


async def test_a_burst_of_200_over_two_instances_admits_exactly_the_limit(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", 60)
    hubs = [await make_client(), await make_client()]
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast?tokens=2"))
    before = metrics.RATE_LIMITED.labels("plan")._value.get()
    clock.freeze()  # the burst arrives within one emission interval, however slow this machine is
    results = await asyncio.gather(*(invoke(hubs[i % 2], caller, tool) for i in range(200)))
    limited = [r for r in results if r.status_code == 429]
    assert len(limited) == 140 and all(_limited(r, "plan") >= 1 for r in limited)
    # exactly the limit was admitted (each logged once, whatever its upstream did on a busy machine)
    assert len(await usage_logs(engine, caller.user_id)) == 60
    assert upstream.count("/fast?tokens=2") >= 60 and sum(r.status_code == 200 for r in results) <= 60
    assert metrics.RATE_LIMITED.labels("plan")._value.get() - before == 140
    assert await _daily_refusals(engine, caller) == (140, 140)  # counted, not logged
    await assert_settled(engine, caller)  # 60 logs, 120 tokens: refusals charged nothing


async def test_retry_after_is_exact_and_sustained_traffic_gets_the_limit_rate(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", 60)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    clock.freeze()  # time moves only when the test says
    for _ in range(60):  # the burst
        assert (await invoke(client, caller, tool)).status_code == 200
    refused = await invoke(client, caller, tool)
    assert _limited(refused, "plan") == 1  # one request a second from here
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    clock.advance(timedelta(milliseconds=850))  # (the GCRA's tolerance is 0.1 s: §4.1's "exact")
    assert (await invoke(client, caller, tool)).status_code == 429  # not earlier
    clock.advance(timedelta(milliseconds=150))
    assert (await invoke(client, caller, tool)).status_code == 200  # after Retry-After
    # twice the limit for two minutes: admitted at the limit's rate, evenly (no window edge)
    admitted: list[float] = []
    for i in range(240):
        clock.advance(timedelta(milliseconds=500))
        if (await invoke(client, caller, tool)).status_code == 200:
            admitted.append(i * 0.5)
    assert 114 <= len(admitted) <= 126  # 60 a minute, ±5 %
    for start in range(0, 180):  # no 60-second window holds more than the limit (+1 at its edge)
        assert sum(start <= t < start + 60 for t in admitted) <= 61
    await assert_settled(engine, caller)


async def test_headers_name_the_tightest_per_minute_limit(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", 300)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"), requests_per_minute=10)
    clock.freeze()
    r = await invoke(client, caller, tool)
    assert r.status_code == 200
    assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("10", "9")
    assert r.headers["X-RateLimit-Reset"] == "6"  # 60/10 s until the bucket is full again
    await set_plan(engine, "pro", None)
    await run_sql(
        engine, "UPDATE tools SET requests_per_minute = NULL, updated_at = now() WHERE id = :t", t=tool
    )
    r = await invoke(client, caller, tool)
    assert r.status_code == 200 and "X-RateLimit-Limit" not in r.headers  # null: no limit, no headers
    assert "X-Quota-Limit" in r.headers


async def test_an_api_key_limit_below_the_plan_and_a_tool_limit_shared_by_everyone(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", 300)
    caller = await make_caller(engine, "pro")
    r = await client.post(
        f"{API}/users/me/api-keys",
        json={"name": "slow script", "requests_per_minute": 5},
        headers=caller.headers,
    )
    assert r.status_code == 201 and r.json()["data"]["requests_per_minute"] == 5
    key = {"Authorization": f"Bearer {r.json()['data']['key']}"}
    tool = await make_tool(engine, upstream.url("/fast"))
    results = await asyncio.gather(*(invoke(client, caller, tool, headers=key) for _ in range(8)))
    assert sorted(r.status_code for r in results) == [200] * 5 + [429] * 3
    assert all(_limited(r, "api_key") for r in results if r.status_code == 429)
    assert (await invoke(client, caller, tool)).status_code == 200  # the access token is not the key

    shared = await make_tool(engine, upstream.url("/fast?tokens=1"), requests_per_minute=10)
    others = [await make_caller(engine, "pro") for _ in range(3)]
    results = await asyncio.gather(*(invoke(client, c, shared) for c in others for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200] * 10 + [429] * 5
    assert all(_limited(r, "tool") for r in results if r.status_code == 429)
    for c in [caller, *others]:
        await assert_settled(engine, c)


async def test_max_concurrent_holds_across_instances(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", None, concurrent=3)
    hubs = [await make_client(), await make_client()]
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/slow?delay=0.4"))
    results = await asyncio.gather(*(invoke(hubs[i % 2], caller, tool) for i in range(10)))
    assert sorted(r.status_code for r in results) == [200] * 3 + [429] * 7
    assert all(_limited(r, "concurrency") == 1 for r in results if r.status_code == 429)
    assert upstream.max_running == 3
    assert (await invoke(hubs[0], caller, tool)).status_code == 200  # a slot is free again
    await assert_settled(engine, caller)


async def test_a_plan_edit_applies_to_the_very_next_call_and_refusals_cost_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, make_client: Any
) -> None:
    admin = await make_caller(engine, None)
    await run_sql(engine, "UPDATE users SET role = 'admin' WHERE id = :u", u=admin.user_id)
    caller = await make_caller(engine, "free")
    tool = await make_tool(engine, upstream.url("/fast"))
    r = await client.patch(f"{API}/admin/plans/free", json={"requests_per_minute": 1}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["data"]["requests_per_minute"] == 1
    clock.freeze()
    assert (await invoke(client, caller, tool)).status_code == 200
    assert _limited(await invoke(client, caller, tool), "plan") == 60
    r = await client.patch(
        f"{API}/admin/plans/free", json={"requests_per_minute": None}, headers=admin.headers
    )
    assert r.status_code == 200 and r.json()["data"]["requests_per_minute"] is None
    assert (await invoke(client, caller, tool)).status_code == 200  # null: unlimited, at once
    plans = {p["code"]: p for p in (await client.get(f"{API}/subscriptions/plans")).json()["data"]}
    assert plans["free"]["requests_per_minute"] is None and "max_concurrent" in plans["free"]
    r = await client.patch(f"{API}/admin/plans/free", json={"max_concurrent": 0}, headers=admin.headers)
    assert r.status_code == 422

    fresh = await make_caller(engine, "free")
    await set_plan(engine, "free", None, concurrent=1)
    await run_sql(engine, "UPDATE subscriptions SET inflight = 1 WHERE id = :s", s=fresh.subscription_id)
    assert _limited(await invoke(client, fresh, tool), "concurrency") == 1
    await run_sql(engine, "UPDATE subscriptions SET inflight = 0 WHERE id = :s", s=fresh.subscription_id)
    await assert_untouched(engine, fresh)  # no log, no charge, no reservation
    await assert_settled(engine, caller)


async def test_refusals_per_day_show_in_the_summary_and_the_platform_stats(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    from joyhub.core.clock import utcnow

    await set_plan(engine, "free", 2)
    caller = await make_caller(engine, "free")
    admin = await make_caller(engine, None)
    await run_sql(engine, "UPDATE users SET role = 'admin' WHERE id = :u", u=admin.user_id)
    tool = await make_tool(engine, upstream.url("/fast"))
    clock.freeze()
    codes = [(await invoke(client, caller, tool)).status_code for _ in range(5)]
    assert codes == [200, 200, 429, 429, 429]
    today = utcnow().date().isoformat()
    summary = (await client.get(f"{API}/usage/summary", headers=caller.headers)).json()["data"]
    assert summary["rate_limited"] == [{"date": today, "refusals": 3}]
    assert summary["total_invocations"] == 2  # refusals are not invocations
    stats = (await client.get(f"{API}/admin/usage/stats", headers=admin.headers)).json()["data"]
    assert stats["rate_limited"] == [{"date": today, "refusals": 3}]
    assert stats["total_invocations"] == 2


async def test_a_burst_of_exactly_the_limit_passes_whatever_order_the_clocks_reach_the_row(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    """Each request carries its own `now`; they reach the row lock in any order. A burst of
    exactly L (here L = 7, whose interval 60/7 s does not round to the microsecond) passes whole."""
    await set_plan(engine, "pro", 7)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    clock.freeze()
    clock.advance(timedelta(milliseconds=50))
    assert (await invoke(client, caller, tool)).status_code == 200  # the latest clock first
    clock.advance(timedelta(milliseconds=-50))
    codes = [(await invoke(client, caller, tool)).status_code for _ in range(7)]
    assert codes == [200] * 6 + [429]


async def test_refusals_in_one_batch_say_what_they_would_have_said_one_by_one(
    engine: AsyncEngine, upstream: Upstream, make_client: Any
) -> None:
    """Group commit: a quota-exhausted call behind an admitted one is QUOTA_EXCEEDED, not a
    concurrency refusal (the review's case: 10 tokens left, max_concurrent 2)."""
    await set_plan(engine, "pro", None, concurrent=2)
    caller = await make_caller(engine, "pro", tokens_used=49_990)  # 10 tokens left
    tool = await make_tool(engine, upstream.url("/slow?delay=0.3&tokens=1"))
    hub = await make_client()
    big = {"text": "x" * 40}  # reserves 11 tokens: one call takes all that is left
    results = await asyncio.gather(*(invoke(hub, caller, tool, big) for _ in range(5)))
    codes = sorted(
        (r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "") for r in results
    )
    assert codes == [(200, "")] + [(429, "QUOTA_EXCEEDED")] * 4
    await assert_settled(engine, caller, baseline=49_990)


async def test_retry_after_waits_for_every_limit_the_call_is_over(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    await set_plan(engine, "pro", 60)
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"), requests_per_minute=1)
    other = await make_tool(engine, upstream.url("/fast"))
    clock.freeze()
    assert (await invoke(client, caller, tool)).status_code == 200  # the tool's one call a minute
    for _ in range(59):  # the rest of the plan's burst, on another tool
        assert (await invoke(client, caller, other)).status_code == 200
    r = await invoke(client, caller, tool)  # over the plan (1 s away) and the tool (60 s away)
    assert _limited(r, "plan") == 60  # named: the plan's limit; waits: for the tool's too

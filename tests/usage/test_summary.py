"""GET /usage/summary: totals, per tool and quota, read from the rollups (+ raw ragged edges)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import iso_utc, utcnow
from tests.factories import make_account, make_subscription
from tests.usage.factories import make_api_key, make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/usage/summary"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def iso(value: datetime) -> str:
    return iso_utc(value)


async def test_summary_equals_history_equals_subscription_counters(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Mixed successes and failures over a billing period that starts mid-day: the default
    summary, the history of that period and the subscription's counter all agree."""
    acc = await make_account(engine)
    alpha, beta = await make_tool(engine, "Alpha"), await make_tool(engine, "Beta")
    now = utcnow()
    start = now - timedelta(days=3, hours=5, minutes=17)
    rng = random.Random(7)
    expected = {"success": 0, "error": 0, "timeout": 0}
    tokens_by_tool = {alpha: 0, beta: 0}
    calls_by_tool = {alpha: 0, beta: 0}
    # before the period: never counted
    await record_invocation(engine, acc.user_id, alpha, tokens=999, ts=start - timedelta(seconds=1))
    for i in range(40):
        ts = start + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
        tool = alpha if i % 3 else beta
        status = rng.choice(["success", "success", "success", "error", "timeout"])
        tokens = rng.randrange(1, 500) if status == "success" else 0
        await record_invocation(engine, acc.user_id, tool, status=status, tokens=tokens, ts=ts)
        expected[status] += 1
        tokens_by_tool[tool] += tokens
        calls_by_tool[tool] += 1
    # exactly at the period start: counted
    await record_invocation(engine, acc.user_id, beta, tokens=11, ts=start)
    expected["success"] += 1
    tokens_by_tool[beta] += 11
    calls_by_tool[beta] += 1
    await record_pending(engine, acc.user_id, alpha, ts=now - timedelta(minutes=1))
    total_tokens = sum(tokens_by_tool.values())
    await make_subscription(
        engine,
        acc.user_id,
        "pro",
        tokens_used=total_tokens,
        current_period_start=start,
        current_period_end=start + timedelta(days=30),
    )

    r = await client.get(URL, headers=acc.headers)
    assert r.status_code == 200, r.text
    s = r.json()["data"]
    assert s["period_start"] == iso(start) and s["period_end"] == iso(start + timedelta(days=30))
    assert s["total_invocations"] == sum(expected.values())
    assert s["successful_invocations"] == expected["success"]
    assert s["failed_invocations"] == expected["error"] + expected["timeout"]
    assert s["total_tokens"] == total_tokens
    assert s["quota"] == {
        "plan": "pro",
        "token_limit": 50000,
        "tokens_used": total_tokens,
        "tokens_remaining": 50000 - total_tokens,
        "period_end": iso(start + timedelta(days=30)),
    }
    assert {t["tool_id"]: (t["invocations"], t["tokens"]) for t in s["by_tool"]} == {
        str(alpha): (calls_by_tool[alpha], tokens_by_tool[alpha]),
        str(beta): (calls_by_tool[beta], tokens_by_tool[beta]),
    }
    assert {t["tool_name"] for t in s["by_tool"]} == {"Alpha", "Beta"}

    # history over the same period: same count, same tokens
    params = {"start_date": s["period_start"], "end_date": s["period_end"], "limit": 100}
    h = (await client.get("/api/v1/usage", headers=acc.headers, params=params)).json()
    assert h["meta"]["pagination"]["total"] == s["total_invocations"] == len(h["data"])
    assert sum(x["tokens_used"] for x in h["data"]) == s["total_tokens"]
    failed = sum(1 for x in h["data"] if x["status"] in ("error", "timeout"))
    assert failed == s["failed_invocations"]
    # timeseries over the same period adds up too
    ts = (await client.get("/api/v1/usage/timeseries", headers=acc.headers)).json()["data"]
    assert sum(p["invocations"] for p in ts) == s["total_invocations"]
    assert sum(p["tokens"] for p in ts) == s["total_tokens"]
    # and the subscription row itself
    async with engine.connect() as conn:
        used = (
            await conn.execute(
                text("SELECT tokens_used FROM subscriptions WHERE user_id = :u"), {"u": acc.user_id}
            )
        ).scalar_one()
    assert used == s["total_tokens"]


async def test_without_subscription_default_is_the_last_30_days_and_no_quota(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    await record_invocation(engine, acc.user_id, tool, tokens=5, ts=today - timedelta(days=29))  # first day
    await record_invocation(engine, acc.user_id, tool, tokens=7, ts=today - timedelta(days=29, seconds=1))
    s = (await client.get(URL, headers=acc.headers)).json()["data"]
    assert s["period_start"] == iso(today - timedelta(days=29))
    assert s["period_end"] == iso(today + timedelta(days=1))
    assert (s["total_invocations"], s["total_tokens"], s["quota"]) == (1, 5, None)


async def test_a_cancelled_subscription_is_not_a_current_period(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    old = utcnow() - timedelta(days=90)
    await make_subscription(
        engine,
        acc.user_id,
        "pro",
        status="cancelled",
        current_period_start=old,
        current_period_end=old + timedelta(days=30),
    )
    s = (await client.get(URL, headers=acc.headers)).json()["data"]
    assert s["quota"] is None
    assert s["period_end"] == iso(
        utcnow().replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    )


async def test_an_overdue_period_is_rolled_forward_before_summarising(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    start = utcnow() - timedelta(days=31)
    await make_subscription(
        engine,
        acc.user_id,
        "free",
        tokens_used=700,
        current_period_start=start,
        current_period_end=start + timedelta(days=30),
    )
    s = (await client.get(URL, headers=acc.headers)).json()["data"]
    assert s["period_start"] == iso(start + timedelta(days=30))
    assert s["quota"]["tokens_used"] == 0 and s["quota"]["tokens_remaining"] == 1000


async def test_explicit_ranges_match_a_brute_force_count(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    tools = [await make_tool(engine, f"T{i}") for i in range(3)]
    rng = random.Random(11)
    base = utc(2025, 5, 1)
    rows = []
    for _ in range(120):
        ts = base + timedelta(seconds=rng.randrange(0, 6 * 86400))
        tool = rng.choice(tools)
        status = rng.choice(["success", "success", "error", "timeout"])
        tokens = rng.randrange(1, 90) if status == "success" else 0
        await record_invocation(engine, acc.user_id, tool, status=status, tokens=tokens, ts=ts)
        rows.append((ts, tool, status, tokens))
    windows = [
        ("2025-05-01", "2025-05-06"),
        ("2025-05-02", "2025-05-02"),
        ("2025-05-02T13:45:00Z", "2025-05-05T03:10:00Z"),
        ("2025-05-03T01:00:00Z", "2025-05-03T01:30:00Z"),
        ("2025-05-03T23:30:00Z", "2025-05-04T00:30:00Z"),
        ("2025-05-01T00:00:01", "2025-05-04"),
        ("2025-06-01", "2025-06-30"),
    ]
    for start_raw, end_raw in windows:
        r = await client.get(URL, headers=acc.headers, params={"start_date": start_raw, "end_date": end_raw})
        assert r.status_code == 200, r.text
        s = r.json()["data"]
        lo = datetime.fromisoformat(s["period_start"])
        hi = datetime.fromisoformat(s["period_end"])
        inside = [x for x in rows if lo <= x[0] < hi]
        assert s["total_invocations"] == len(inside), (start_raw, end_raw)
        assert s["successful_invocations"] == sum(1 for x in inside if x[2] == "success")
        assert s["failed_invocations"] == sum(1 for x in inside if x[2] != "success")
        assert s["total_tokens"] == sum(x[3] for x in inside)
        per_tool = {str(t): sum(1 for x in inside if x[1] == t) for t in tools}
        assert {t["tool_id"]: t["invocations"] for t in s["by_tool"]} == {
            k: v for k, v in per_tool.items() if v
        }
        # by_tool is busiest first
        counts = [t["invocations"] for t in s["by_tool"]]
        assert counts == sorted(counts, reverse=True)


async def test_range_checks(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-03-05", "end_date": "2025-03-01"}
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "query.start_date"
    r = await client.get(URL, headers=acc.headers, params={"start_date": "03/01/2025"})
    assert r.status_code == 422
    # one side given, the other defaulted (the last 30 days): a start after that end is inverted too
    r = await client.get(URL, headers=acc.headers, params={"start_date": "2999-01-01"})
    assert r.status_code == 422
    r = await client.get(URL, headers=acc.headers, params={"start_date": "2020-01-01"})
    assert r.status_code == 200
    assert r.json()["data"]["period_start"] == "2020-01-01T00:00:00Z"


async def test_privacy_and_api_key(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    alice, bob = await make_account(engine), await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, alice.user_id, tool, tokens=9, ts=utcnow() - timedelta(hours=1))
    s = (await client.get(URL, headers=bob.headers)).json()["data"]
    assert (s["total_invocations"], s["total_tokens"], s["by_tool"]) == (0, 0, [])
    key = await make_api_key(engine, alice.user_id)
    s = (await client.get(URL, headers={"X-API-Key": key})).json()["data"]
    assert (s["total_invocations"], s["total_tokens"]) == (1, 9)


async def test_a_period_that_ran_out_on_a_pending_cancellation_has_no_quota(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    start = utcnow() - timedelta(days=31)
    await make_subscription(
        engine,
        acc.user_id,
        "pro",
        tokens_used=5,
        current_period_start=start,
        current_period_end=start + timedelta(days=30),
        cancel_at_period_end=True,
    )
    s = (await client.get(URL, headers=acc.headers)).json()["data"]
    assert s["quota"] is None
    async with engine.connect() as conn:
        status = (
            await conn.execute(
                text("SELECT status FROM subscriptions WHERE user_id = :u"), {"u": acc.user_id}
            )
        ).scalar_one()
    assert status == "cancelled"  # the read rolled it over, as any read does

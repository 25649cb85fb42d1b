"""GET /usage/timeseries: hour/day buckets, empty ones included, range limits, exact partial buckets."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from tests.factories import make_account, make_subscription
from tests.usage.factories import make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/usage/timeseries"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def test_daily_buckets_include_empty_days(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, acc.user_id, tool, tokens=10, ts=utc(2025, 3, 2, 8))
    await record_invocation(engine, acc.user_id, tool, tokens=5, ts=utc(2025, 3, 2, 23, 59, 59))
    await record_invocation(engine, acc.user_id, tool, status="error", ts=utc(2025, 3, 4))
    await record_pending(engine, acc.user_id, tool, ts=utc(2025, 3, 3, 12))
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-03-01", "end_date": "2025-03-05"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [
        {"bucket_start": "2025-03-01T00:00:00Z", "invocations": 0, "tokens": 0},
        {"bucket_start": "2025-03-02T00:00:00Z", "invocations": 2, "tokens": 15},
        {"bucket_start": "2025-03-03T00:00:00Z", "invocations": 0, "tokens": 0},
        {"bucket_start": "2025-03-04T00:00:00Z", "invocations": 1, "tokens": 0},
        {"bucket_start": "2025-03-05T00:00:00Z", "invocations": 0, "tokens": 0},
    ]
    # granularity defaults to day; a one-day range is one bucket
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-03-02", "end_date": "2025-03-02"}
    )
    assert r.json()["data"] == [{"bucket_start": "2025-03-02T00:00:00Z", "invocations": 2, "tokens": 15}]


async def test_hourly_buckets(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, acc.user_id, tool, tokens=3, ts=utc(2025, 3, 1, 1, 0, 0))
    await record_invocation(engine, acc.user_id, tool, tokens=4, ts=utc(2025, 3, 1, 1, 59, 59))
    await record_invocation(engine, acc.user_id, tool, tokens=6, ts=utc(2025, 3, 1, 3, 30))
    params = {"granularity": "hour", "start_date": "2025-03-01T00:00:00Z", "end_date": "2025-03-01T04:00:00Z"}
    data = (await client.get(URL, headers=acc.headers, params=params)).json()["data"]
    assert [(p["bucket_start"][11:16], p["invocations"], p["tokens"]) for p in data] == [
        ("00:00", 0, 0),
        ("01:00", 2, 7),
        ("02:00", 0, 0),
        ("03:00", 1, 6),
    ]
    whole_day = {"granularity": "hour", "start_date": "2025-03-01", "end_date": "2025-03-01"}
    data = (await client.get(URL, headers=acc.headers, params=whole_day)).json()["data"]
    assert len(data) == 24 and sum(p["invocations"] for p in data) == 3


@pytest.mark.parametrize(
    ("granularity", "start", "end", "status"),
    [
        ("day", "2024-01-01", "2024-12-31", 200),  # 366 days (leap year)
        ("day", "2024-01-01", "2025-01-01", 422),  # 367 days
        ("day", "2025-01-01T00:00:00Z", "2026-01-02T00:00:00Z", 200),  # 366 days of timestamps
        ("day", "2025-01-01T00:00:00Z", "2026-01-02T00:00:01Z", 422),
        ("hour", "2025-01-01", "2025-01-31", 200),  # 31 days
        ("hour", "2025-01-01", "2025-02-01", 422),  # 32 days
        ("hour", "2025-01-01T06:00:00Z", "2025-02-01T06:00:00Z", 200),
        ("hour", "2025-01-01T06:00:00Z", "2025-02-01T06:00:01Z", 422),
        ("week", "2025-01-01", "2025-01-02", 422),
        ("HOUR", "2025-01-01", "2025-01-02", 422),
    ],
)
async def test_range_limits(
    client: httpx.AsyncClient, engine: AsyncEngine, granularity: str, start: str, end: str, status: int
) -> None:
    acc = await make_account(engine)
    params = {"granularity": granularity, "start_date": start, "end_date": end}
    r = await client.get(URL, headers=acc.headers, params=params)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    else:
        span = datetime.fromisoformat(r.json()["data"][-1]["bucket_start"]) - datetime.fromisoformat(
            r.json()["data"][0]["bucket_start"]
        )
        assert span <= timedelta(days=366)


async def test_inverted_and_empty_ranges(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    r = await client.get(
        URL, headers=acc.headers, params={"start_date": "2025-03-02", "end_date": "2025-03-01"}
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "query.start_date"
    same = {"start_date": "2025-03-02T10:00:00Z", "end_date": "2025-03-02T10:00:00Z", "granularity": "hour"}
    r = await client.get(URL, headers=acc.headers, params=same)
    assert r.status_code == 200 and r.json()["data"] == []


async def test_partial_buckets_count_only_their_part_in_range(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Random data, ragged windows: every bucket equals a brute-force count, and the buckets add
    up to the summary of the same window."""
    acc = await make_account(engine)
    tools = [await make_tool(engine), await make_tool(engine)]
    rng = random.Random(5)
    base = utc(2025, 7, 1)
    rows = []
    for _ in range(150):
        ts = base + timedelta(seconds=rng.randrange(0, 4 * 86400))
        status = rng.choice(["success", "success", "error", "timeout"])
        tokens = rng.randrange(1, 50) if status == "success" else 0
        await record_invocation(engine, acc.user_id, rng.choice(tools), status=status, tokens=tokens, ts=ts)
        rows.append((ts, tokens))
    windows = [
        ("day", "2025-07-01T05:17:00Z", "2025-07-04T19:02:30Z"),
        ("day", "2025-07-02T23:59:00Z", "2025-07-03T00:01:00Z"),
        ("day", "2025-07-02T10:00:00Z", "2025-07-02T10:20:00Z"),
        ("hour", "2025-07-01T05:17:00Z", "2025-07-02T19:02:30Z"),
        ("hour", "2025-07-03T07:10:00Z", "2025-07-03T07:50:00Z"),
        ("hour", "2025-07-03T07:50:00Z", "2025-07-03T08:10:00Z"),
    ]
    for granularity, start_raw, end_raw in windows:
        params = {"granularity": granularity, "start_date": start_raw, "end_date": end_raw}
        data = (await client.get(URL, headers=acc.headers, params=params)).json()["data"]
        lo, hi = datetime.fromisoformat(start_raw), datetime.fromisoformat(end_raw)
        unit = timedelta(days=1) if granularity == "day" else timedelta(hours=1)
        for point in data:
            b0 = datetime.fromisoformat(point["bucket_start"])
            inside = [t for ts, t in rows if max(lo, b0) <= ts < min(hi, b0 + unit)]
            assert (point["invocations"], point["tokens"]) == (len(inside), sum(inside)), (params, point)
        summary = (
            await client.get(
                "/api/v1/usage/summary",
                headers=acc.headers,
                params={"start_date": start_raw, "end_date": end_raw},
            )
        ).json()["data"]
        assert sum(p["invocations"] for p in data) == summary["total_invocations"]
        assert sum(p["tokens"] for p in data) == summary["total_tokens"]


async def test_default_range_is_the_billing_period(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    start = utcnow() - timedelta(days=2, hours=3)
    await make_subscription(
        engine, acc.user_id, "pro", current_period_start=start, current_period_end=start + timedelta(days=30)
    )
    data = (await client.get(URL, headers=acc.headers)).json()["data"]
    assert len(data) in (30, 31)
    first = datetime.fromisoformat(data[0]["bucket_start"])
    assert first == start.replace(hour=0, minute=0, second=0, microsecond=0)
    hourly = (await client.get(URL, headers=acc.headers, params={"granularity": "hour"})).json()["data"]
    assert len(hourly) == 30 * 24 + 1  # ragged period: the first and last hours are partial
    # a plan with a long period: the default hourly series keeps to the 31 days it allows
    long = await make_account(engine)
    start = utcnow() - timedelta(days=100)
    await make_subscription(
        engine,
        long.user_id,
        "pro",
        current_period_start=start,
        current_period_end=start + timedelta(days=365),
    )
    r = await client.get(URL, headers=long.headers, params={"granularity": "hour"})
    assert r.status_code == 200
    hourly = r.json()["data"]
    assert len(hourly) <= 31 * 24 + 1
    assert datetime.fromisoformat(hourly[-1]["bucket_start"]) <= utcnow()


async def test_privacy(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    alice, bob = await make_account(engine), await make_account(engine)
    tool = await make_tool(engine)
    await record_invocation(engine, alice.user_id, tool, tokens=3, ts=utc(2025, 3, 1, 5))
    for granularity in ("day", "hour"):
        params = {"granularity": granularity, "start_date": "2025-03-01", "end_date": "2025-03-01"}
        data = (await client.get(URL, headers=bob.headers, params=params)).json()["data"]
        assert sum(p["invocations"] for p in data) == 0
        data = (await client.get(URL, headers=alice.headers, params=params)).json()["data"]
        assert sum(p["invocations"] for p in data) == 1

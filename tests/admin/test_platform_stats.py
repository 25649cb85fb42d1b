"""GET /admin/usage/stats: every PlatformStats field on a small known dataset, from the rollups."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import iso_utc, utcnow
from tests.factories import make_account, make_admin, make_subscription
from tests.usage.factories import make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/admin/usage/stats"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def test_every_field_on_a_known_dataset(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    u1 = await make_account(engine, email="one@example.com")
    u2 = await make_account(engine, email="two@example.com")
    u3 = await make_account(engine, email="three@example.com")
    alpha = await make_tool(engine, "Alpha")
    beta = await make_tool(engine, "Beta", deleted_at=utc(2025, 6, 1))  # deleted since: name kept

    async def call(
        user: uuid.UUID, tool: uuid.UUID, ts: datetime, status: str, tokens: int, plan: str | None
    ) -> None:
        await record_invocation(engine, user, tool, status=status, tokens=tokens, ts=ts, plan_code=plan)

    await call(u1.user_id, alpha, utc(2025, 3, 1, 0, 0), "success", 100, "pro")  # first instant of the range
    await call(u1.user_id, alpha, utc(2025, 3, 1, 12), "error", 0, "pro")
    await call(u1.user_id, beta, utc(2025, 3, 3, 9), "success", 50, "pro")
    await call(u2.user_id, beta, utc(2025, 3, 3, 10), "timeout", 0, "enterprise")
    await call(u2.user_id, beta, utc(2025, 3, 3, 23, 59, 59), "success", 30, "enterprise")  # last day
    await call(u3.user_id, alpha, utc(2025, 3, 2, 8), "success", 7, None)
    await call(u3.user_id, alpha, utc(2025, 2, 28, 23, 59, 59), "success", 1000, None)  # before
    await call(u1.user_id, alpha, utc(2025, 3, 4), "success", 1000, "pro")  # after
    await record_pending(engine, u1.user_id, alpha, ts=utc(2025, 3, 2))

    r = await client.get(
        URL, headers=admin.headers, params={"start_date": "2025-03-01", "end_date": "2025-03-03"}
    )
    assert r.status_code == 200, r.text
    s = r.json()["data"]
    assert s["period_start"] == "2025-03-01T00:00:00Z"
    assert s["period_end"] == "2025-03-04T00:00:00Z"
    assert s["total_invocations"] == 6
    assert s["total_tokens"] == 187
    assert s["active_users"] == 3
    assert s["by_status"] == {"success": 4, "error": 1, "timeout": 1, "cancelled": 0}
    assert s["by_tool"] == [
        {"tool_id": str(alpha), "tool_name": "Alpha", "invocations": 3, "tokens": 107},
        {"tool_id": str(beta), "tool_name": "Beta", "invocations": 3, "tokens": 80},
    ]
    assert s["by_plan"] == [
        {"plan": "pro", "invocations": 3, "tokens": 150},
        {"plan": "enterprise", "invocations": 2, "tokens": 30},
        {"plan": None, "invocations": 1, "tokens": 7},
    ]
    assert s["top_users"] == [
        {"user_id": str(u1.user_id), "email": "one@example.com", "invocations": 3, "tokens": 150},
        {"user_id": str(u2.user_id), "email": "two@example.com", "invocations": 2, "tokens": 30},
        {"user_id": str(u3.user_id), "email": "three@example.com", "invocations": 1, "tokens": 7},
    ]
    assert s["daily"] == [
        {"date": "2025-03-01", "invocations": 2, "tokens": 100},
        {"date": "2025-03-02", "invocations": 1, "tokens": 7},
        {"date": "2025-03-03", "invocations": 3, "tokens": 80},
    ]
    assert set(s["subscriptions"]) == {"by_plan", "by_status", "monthly_recurring_revenue_cents", "currency"}

    # a range with nothing in it: zeros everywhere, every day listed
    r = await client.get(
        URL, headers=admin.headers, params={"start_date": "2024-01-01", "end_date": "2024-01-05"}
    )
    s = r.json()["data"]
    assert (s["total_invocations"], s["total_tokens"], s["active_users"]) == (0, 0, 0)
    assert s["by_tool"] == s["by_plan"] == s["top_users"] == []
    assert s["by_status"] == {"success": 0, "error": 0, "timeout": 0, "cancelled": 0}
    assert [d["date"] for d in s["daily"]] == [f"2024-01-0{i}" for i in range(1, 6)]
    assert all(d["invocations"] == 0 for d in s["daily"])


async def test_subscription_counts_and_monthly_recurring_revenue(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    async with engine.begin() as conn:  # a 15-day plan costs twice its price per 30 days
        await conn.execute(text("UPDATE plans SET price_cents = 500, period_days = 15 WHERE code = 'free'"))

    async def sub(plan: str, **fields: object) -> None:
        await make_subscription(engine, (await make_account(engine)).user_id, plan, **fields)

    await sub("pro")  # 1900
    await sub("pro")  # 1900
    await sub("enterprise")  # 9900
    await sub("free")  # 500 * 30 / 15 = 1000
    await sub("pro", cancel_at_period_end=True)  # active, but not recurring
    await sub("pro", status="cancelled")
    await sub("enterprise", status="expired")
    s = (await client.get(URL, headers=admin.headers)).json()["data"]["subscriptions"]
    assert s["by_plan"] == {"free": 1, "pro": 3, "enterprise": 1}
    assert s["by_status"] == {"active": 5, "cancelled": 1, "expired": 1}
    assert s["monthly_recurring_revenue_cents"] == 1900 * 2 + 9900 + 1000
    assert s["currency"] == "USD"


async def test_default_range_is_the_last_30_days_including_today(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    tool = await make_tool(engine)
    now = utcnow()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    await record_invocation(engine, user.user_id, tool, tokens=3, ts=now)
    await record_invocation(engine, user.user_id, tool, tokens=4, ts=today - timedelta(days=29))
    await record_invocation(engine, user.user_id, tool, tokens=5, ts=today - timedelta(days=29, seconds=1))
    s = (await client.get(URL, headers=admin.headers)).json()["data"]
    assert s["period_start"] == iso_utc(today - timedelta(days=29))
    assert s["period_end"] == iso_utc(today + timedelta(days=1))
    assert len(s["daily"]) == 30
    assert s["daily"][-1] == {"date": today.date().isoformat(), "invocations": 1, "tokens": 3}
    assert (s["total_invocations"], s["total_tokens"]) == (2, 7)


async def test_timestamps_are_widened_to_whole_days_and_ranges_are_checked(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    params = {"start_date": "2025-03-01T15:00:00Z", "end_date": "2025-03-03T01:00:00+02:00"}
    s = (await client.get(URL, headers=admin.headers, params=params)).json()["data"]
    assert (s["period_start"], s["period_end"]) == ("2025-03-01T00:00:00Z", "2025-03-03T00:00:00Z")
    assert len(s["daily"]) == 2
    bad = [
        {"start_date": "2025-03-02", "end_date": "2025-03-01"},
        {"start_date": "2024-01-01", "end_date": "2025-01-01"},  # 367 days
        {"start_date": "someday"},
    ]
    for params in bad:
        r = await client.get(URL, headers=admin.headers, params=params)
        assert r.status_code == 422, params
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    r = await client.get(
        URL, headers=admin.headers, params={"start_date": "2024-01-01", "end_date": "2024-12-31"}
    )
    assert r.status_code == 200 and len(r.json()["data"]["daily"]) == 366


async def test_top_and_active_users_agree_with_a_brute_force_count(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Across week boundaries, with ragged days at both ends (weekly + daily rollups), and with
    more than ten users so the top-10 cut and its tie-break matter."""
    admin = await make_admin(engine)
    users = [await make_account(engine) for _ in range(14)]
    tool = await make_tool(engine)
    rng = random.Random(3)
    rows = []
    base = utc(2025, 4, 1)  # a Tuesday
    for _ in range(260):
        user = rng.choice(users[:13])  # the 14th never invokes
        ts = base + timedelta(seconds=rng.randrange(0, 40 * 86400))
        tokens = rng.randrange(1, 30)
        await record_invocation(engine, user.user_id, tool, tokens=tokens, ts=ts)
        rows.append((user, ts.date(), tokens))
    for first, last in [
        (date(2025, 4, 3), date(2025, 4, 29)),  # Thu .. Tue: 3 whole weeks + ragged ends
        (date(2025, 4, 7), date(2025, 4, 20)),  # exactly two Monday weeks
        (date(2025, 4, 8), date(2025, 4, 12)),  # inside one week
        (date(2025, 4, 1), date(2025, 5, 10)),
    ]:
        params = {"start_date": first.isoformat(), "end_date": last.isoformat()}
        s = (await client.get(URL, headers=admin.headers, params=params)).json()["data"]
        totals: dict[str, tuple[int, int]] = {}
        for user, day, tokens in rows:
            if first <= day <= last:
                inv, tok = totals.get(user.email, (0, 0))
                totals[user.email] = (inv + 1, tok + tokens)
        expected = sorted(totals.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:10]
        got = [(u["email"], (u["invocations"], u["tokens"])) for u in s["top_users"]]
        # ties on both counts are broken by user id: compare the counts, then the sets per count
        assert [g[1] for g in got] == [e[1] for e in expected], params
        assert s["active_users"] == len(totals)
        assert s["total_invocations"] == sum(v[0] for v in totals.values())
        assert sum(d["invocations"] for d in s["daily"]) == s["total_invocations"]


async def test_cancelled_calls_count_everywhere_and_by_status(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A stream the caller hung up on is settled and charged for what was relayed: it is in the
    totals, the tool, plan, user and daily figures, and in `by_status.cancelled` (the four statuses
    add up to the total)."""
    admin = await make_admin(engine)
    u1 = await make_account(engine, email="streamer@example.com")
    u2 = await make_account(engine, email="quiet@example.com")
    tool = await make_tool(engine, "Stream")
    calls = [
        (u1.user_id, utc(2025, 3, 1, 0, 0), "cancelled", 40, "pro"),  # first instant of the range
        (u1.user_id, utc(2025, 3, 1, 9), "cancelled", 25, "pro"),
        (u1.user_id, utc(2025, 3, 2, 23, 59, 59), "success", 10, "pro"),
        (u2.user_id, utc(2025, 3, 2, 8), "cancelled", 3, None),
        (u2.user_id, utc(2025, 3, 2, 9), "error", 0, None),
        (u1.user_id, utc(2025, 3, 3), "cancelled", 1000, "pro"),  # after the range
        (u2.user_id, utc(2025, 2, 28, 23, 59, 59), "cancelled", 1000, None),  # before
    ]
    for user, ts, status, tokens, plan in calls:
        await record_invocation(engine, user, tool, status=status, tokens=tokens, ts=ts, plan_code=plan)
    params = {"start_date": "2025-03-01", "end_date": "2025-03-02"}
    r = await client.get(URL, headers=admin.headers, params=params)
    assert r.status_code == 200, r.text
    s = r.json()["data"]
    assert s["by_status"] == {"success": 1, "error": 1, "timeout": 0, "cancelled": 3}
    assert sum(s["by_status"].values()) == s["total_invocations"] == 5
    assert s["total_tokens"] == 78
    assert s["active_users"] == 2
    assert s["by_tool"] == [{"tool_id": str(tool), "tool_name": "Stream", "invocations": 5, "tokens": 78}]
    assert s["by_plan"] == [
        {"plan": "pro", "invocations": 3, "tokens": 75},
        {"plan": None, "invocations": 2, "tokens": 3},
    ]
    assert s["top_users"] == [
        {"user_id": str(u1.user_id), "email": "streamer@example.com", "invocations": 3, "tokens": 75},
        {"user_id": str(u2.user_id), "email": "quiet@example.com", "invocations": 2, "tokens": 3},
    ]
    assert s["daily"] == [
        {"date": "2025-03-01", "invocations": 2, "tokens": 65},
        {"date": "2025-03-02", "invocations": 3, "tokens": 13},
    ]
    # the user-facing summary of the same days agrees
    summary = (await client.get("/api/v1/usage/summary", headers=u1.headers, params=params)).json()["data"]
    assert (summary["total_invocations"], summary["cancelled_invocations"], summary["total_tokens"]) == (
        3,
        2,
        75,
    )

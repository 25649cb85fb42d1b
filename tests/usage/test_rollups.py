"""rollups.bump keeps every read model equal to an aggregate of the settled raw logs."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.usage.rollups import platform_shard
from tests.factories import make_account
from tests.usage.factories import make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

CHECKS = {
    "usage_daily": (
        "SELECT user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, cancelled,"
        " tokens FROM usage_daily",
        """SELECT user_id, (timestamp AT TIME ZONE 'UTC')::date, tool_id, coalesce(plan_code, ''), count(*),
                   count(*) FILTER (WHERE status = 'success'), count(*) FILTER (WHERE status = 'error'),
                   count(*) FILTER (WHERE status = 'timeout'), count(*) FILTER (WHERE status = 'cancelled'),
                   sum(tokens_used)
            FROM usage_logs WHERE status <> 'pending' GROUP BY 1, 2, 3, 4""",
    ),
    "usage_hourly": (
        "SELECT user_id, hour, invocations, tokens FROM usage_hourly",
        """SELECT user_id, date_trunc('hour', timestamp AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*),
                   sum(tokens_used)
            FROM usage_logs WHERE status <> 'pending' GROUP BY 1, 2""",
    ),
    "usage_user_daily": (
        "SELECT user_id, day, invocations, tokens FROM usage_user_daily",
        """SELECT user_id, (timestamp AT TIME ZONE 'UTC')::date, count(*), sum(tokens_used)
            FROM usage_logs WHERE status <> 'pending' GROUP BY 1, 2""",
    ),
    "usage_user_weekly": (
        "SELECT user_id, week, invocations, tokens FROM usage_user_weekly",
        """SELECT user_id, date_trunc('week', timestamp AT TIME ZONE 'UTC')::date, count(*), sum(tokens_used)
            FROM usage_logs WHERE status <> 'pending' GROUP BY 1, 2""",
    ),
    "usage_platform_daily": (
        """SELECT day, tool_id, plan_code, sum(invocations), sum(successes), sum(errors), sum(timeouts),
                  sum(cancelled), sum(tokens)
           FROM usage_platform_daily GROUP BY 1, 2, 3""",
        """SELECT (timestamp AT TIME ZONE 'UTC')::date, tool_id, coalesce(plan_code, ''), count(*),
                   count(*) FILTER (WHERE status = 'success'), count(*) FILTER (WHERE status = 'error'),
                   count(*) FILTER (WHERE status = 'timeout'), count(*) FILTER (WHERE status = 'cancelled'),
                   sum(tokens_used)
            FROM usage_logs WHERE status <> 'pending' GROUP BY 1, 2, 3""",
    ),
}


async def test_every_rollup_equals_the_raw_aggregate(engine: AsyncEngine) -> None:
    users = [(await make_account(engine)).user_id for _ in range(4)]
    tools = [await make_tool(engine) for _ in range(3)]
    rng = random.Random(9)
    base = datetime(2025, 1, 30, tzinfo=UTC)  # across a month and several week boundaries
    for _ in range(200):
        status = rng.choice(["success", "success", "error", "timeout", "cancelled"])
        await record_invocation(
            engine,
            rng.choice(users),
            rng.choice(tools),
            status=status,
            tokens=rng.randrange(1, 100) if status in ("success", "cancelled") else 0,
            ts=base + timedelta(seconds=rng.randrange(0, 20 * 86400)),
            plan_code=rng.choice(["pro", "free", None]),
        )
    await record_pending(engine, users[0], tools[0], ts=base)
    async with engine.connect() as conn:
        for table, (rollup, raw) in CHECKS.items():
            got = sorted(tuple(r) for r in (await conn.execute(text(rollup))).all())
            want = sorted(tuple(r) for r in (await conn.execute(text(raw))).all())
            assert got == want, table
        shards = (
            await conn.execute(
                text("SELECT DISTINCT plan_code = '' OR true, shard FROM usage_platform_daily")
            )
        ).all()
    assert {s for _, s in shards} <= set(range(16))


async def test_the_sql_shard_of_the_backfill_matches_bump(engine: AsyncEngine) -> None:
    ids = [uuid.uuid4() for _ in range(64)]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT u, ('x' || right(u::text, 1))::bit(4)::int FROM unnest(CAST(:ids AS uuid[])) AS u"
                ),
                {"ids": ids},
            )
        ).all()
    assert {u: s for u, s in rows} == {u: platform_shard(u) for u in ids}

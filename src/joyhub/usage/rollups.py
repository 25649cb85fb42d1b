"""The read models behind summaries, timeseries and platform stats.

- `usage_daily` (user, UTC day, tool, plan; per-status counts): summaries, history totals.
- `usage_hourly` (user, UTC hour): hourly timeseries and the partial days of daily ones.
- `usage_user_daily` (user, UTC day) and `usage_user_weekly` (user, UTC week from Monday):
  platform stats' active users and top users (whole weeks from the weekly one, the ragged days
  at the ends of the range from the daily one).
- `usage_platform_daily` (UTC day, tool, plan, shard; per-status counts): platform stats' totals,
  by status/tool/plan and daily series. Sharded by the user id's low 4 bits, so settles of
  different users seldom wait on one row lock (a single row per day/tool/plan would serialise
  every settle of a popular tool).

Every settled invocation is counted in the statement that settles it (the settle statement of
`tools/metering.py` embeds `ROLLUP_CTES`), so rollups never drift from raw logs and a settle is a
single round trip. `bump` counts one invocation the same way from parameters (the stale sweep);
a transaction that bumps several invocations should bump them in a stable order (e.g. by tool,
plan, shard) so two such transactions cannot deadlock on shared platform rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.models.usage import PLATFORM_SHARDS

# The rollup upserts as CTEs that count every row of a CTE named `settled` — columns user_id,
# org_id (null for a personal call), tool_id, plan_code ('' for none), shard, ts (timestamptz),
# success, error, timeout, cancelled (0/1) and tokens; one row per settled call. The personal read
# models count personal calls only (API.md §13: personal usage shows personal calls),
# `usage_org_daily` counts organization calls by member, the platform's counts every call. Each
# upsert first adds up the rows that fall on the same rollup row (a batch of calls settled
# together, `metering.py`), so one statement never updates a row twice, and takes its rows in key
# order, so two batches cannot deadlock on them. Put them in a WITH after `settled`: the settle
# statement derives `settled` from the usage logs it closes, `bump` from parameters. One text for
# both, so the rollups cannot be counted one way at settle and another in the sweep.
_PERSONAL_ROLLUPS = [
    """
    daily AS (
        INSERT INTO usage_daily AS d
            (user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, cancelled, tokens,
             input_tokens, output_tokens)
        SELECT user_id, ts AT TIME ZONE 'UTC', tool_id, plan_code, count(*), sum(success), sum(error),
               sum(timeout), sum(cancelled), sum(tokens), COALESCE(sum(input_tokens), 0),
               COALESCE(sum(output_tokens), 0)
        FROM settled WHERE org_id IS NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (user_id, day, tool_id, plan_code) DO UPDATE SET
            invocations = d.invocations + EXCLUDED.invocations,
            successes = d.successes + EXCLUDED.successes,
            errors = d.errors + EXCLUDED.errors,
            timeouts = d.timeouts + EXCLUDED.timeouts,
            cancelled = d.cancelled + EXCLUDED.cancelled,
            tokens = d.tokens + EXCLUDED.tokens,
            input_tokens = d.input_tokens + EXCLUDED.input_tokens,
            output_tokens = d.output_tokens + EXCLUDED.output_tokens
        RETURNING 1
    )
""",
    """
    user_daily AS (
        INSERT INTO usage_user_daily AS ud (user_id, day, invocations, tokens)
        SELECT user_id, ts AT TIME ZONE 'UTC', count(*), sum(tokens)
        FROM settled WHERE org_id IS NULL GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (user_id, day) DO UPDATE SET
            invocations = ud.invocations + EXCLUDED.invocations,
            tokens = ud.tokens + EXCLUDED.tokens
        RETURNING 1
    )
""",
    """
    user_weekly AS (
        INSERT INTO usage_user_weekly AS uw (user_id, week, invocations, tokens)
        SELECT user_id, date_trunc('week', ts AT TIME ZONE 'UTC'), count(*), sum(tokens)
        FROM settled WHERE org_id IS NULL GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (user_id, week) DO UPDATE SET
            invocations = uw.invocations + EXCLUDED.invocations,
            tokens = uw.tokens + EXCLUDED.tokens
        RETURNING 1
    )
""",
    """
    hourly AS (
        INSERT INTO usage_hourly AS h (user_id, hour, invocations, tokens)
        SELECT user_id, date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*), sum(tokens)
        FROM settled WHERE org_id IS NULL GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (user_id, hour) DO UPDATE SET
            invocations = h.invocations + EXCLUDED.invocations,
            tokens = h.tokens + EXCLUDED.tokens
        RETURNING 1
    )
""",
]

_ORG_ROLLUPS = [
    """
    org_daily AS (
        INSERT INTO usage_org_daily AS od
            (org_id, day, user_id, tool_id, invocations, successes, errors, timeouts, cancelled, tokens,
             input_tokens, output_tokens)
        SELECT org_id, ts AT TIME ZONE 'UTC', user_id, tool_id, count(*), sum(success), sum(error),
               sum(timeout), sum(cancelled), sum(tokens), COALESCE(sum(input_tokens), 0),
               COALESCE(sum(output_tokens), 0)
        FROM settled WHERE org_id IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (org_id, day, user_id, tool_id) DO UPDATE SET
            invocations = od.invocations + EXCLUDED.invocations,
            successes = od.successes + EXCLUDED.successes,
            errors = od.errors + EXCLUDED.errors,
            timeouts = od.timeouts + EXCLUDED.timeouts,
            cancelled = od.cancelled + EXCLUDED.cancelled,
            tokens = od.tokens + EXCLUDED.tokens,
            input_tokens = od.input_tokens + EXCLUDED.input_tokens,
            output_tokens = od.output_tokens + EXCLUDED.output_tokens
        RETURNING 1
    )
""",
]

_PLATFORM_ROLLUPS = [
    """
    platform AS (
        INSERT INTO usage_platform_daily AS p
            (day, tool_id, plan_code, shard, invocations, successes, errors, timeouts, cancelled, tokens)
        SELECT ts AT TIME ZONE 'UTC', tool_id, plan_code, shard, count(*), sum(success), sum(error),
               sum(timeout), sum(cancelled), sum(tokens)
        FROM settled GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (day, tool_id, plan_code, shard) DO UPDATE SET
            invocations = p.invocations + EXCLUDED.invocations,
            successes = p.successes + EXCLUDED.successes,
            errors = p.errors + EXCLUDED.errors,
            timeouts = p.timeouts + EXCLUDED.timeouts,
            cancelled = p.cancelled + EXCLUDED.cancelled,
            tokens = p.tokens + EXCLUDED.tokens
        RETURNING 1
    )
""",
]


def rollup_ctes(*, personal: bool = True, orgs: bool = True) -> str:
    """The upserts as one list of CTEs. A batch with no personal call (`personal=False`) or no
    organization call (`orgs=False`) leaves out those read models' upserts: they could change
    nothing, and every part of a statement costs PostgreSQL its start-up."""
    ctes = (_PERSONAL_ROLLUPS if personal else []) + (_ORG_ROLLUPS if orgs else []) + _PLATFORM_ROLLUPS
    return ", ".join(cte.strip("\n") for cte in ctes) + "\n"


ROLLUP_CTES = rollup_ctes()

_BUMP = text(
    """
    WITH settled AS (
        SELECT CAST(:user_id AS uuid) AS user_id, CAST(:org_id AS uuid) AS org_id,
               CAST(:tool_id AS uuid) AS tool_id,
               CAST(:plan_code AS varchar) AS plan_code, CAST(:shard AS integer) AS shard,
               CAST(:ts AS timestamptz) AS ts, CAST(:success AS integer) AS success,
               CAST(:error AS integer) AS error, CAST(:timeout AS integer) AS timeout,
               CAST(:cancelled AS integer) AS cancelled, CAST(:tokens AS bigint) AS tokens,
               CAST(NULL AS bigint) AS input_tokens, CAST(NULL AS bigint) AS output_tokens
    ), """
    + ROLLUP_CTES
    + "SELECT 1"
)


def platform_shard(user_id: uuid.UUID) -> int:
    """The user's shard of `usage_platform_daily`: the low 4 bits of the id (its last hex digit,
    which migration 0003 computes in SQL the same way)."""
    return user_id.int % PLATFORM_SHARDS


async def bump(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    tool_id: uuid.UUID,
    plan_code: str | None,
    org_id: uuid.UUID | None = None,
    ts: datetime,
    status: str,
    tokens: int,
) -> None:
    """Count one settled invocation (status success/error/timeout/cancelled) in the day and hour
    of `ts`."""
    await session.execute(
        _BUMP,
        {
            "user_id": user_id,
            "org_id": org_id,
            "tool_id": tool_id,
            "plan_code": plan_code or "",
            "shard": platform_shard(user_id),
            "ts": ts,
            "success": int(status == "success"),
            "error": int(status == "error"),
            "timeout": int(status == "timeout"),
            "cancelled": int(status == "cancelled"),
            "tokens": tokens,
        },
    )

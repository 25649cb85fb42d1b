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
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.batch_sql import COUNT, Total, per_key
from joyhub.models.usage import PLATFORM_SHARDS

# The rollup upserts as CTEs that count every row of a CTE named `settled` — columns user_id,
# org_id (null for a personal call), tool_id, plan_code ('' for none), shard, ts (timestamptz),
# success, error, timeout, cancelled (0/1) and tokens; one row per settled call. The personal read
# models count personal calls only (API.md §13: personal usage shows personal calls),
# `usage_org_daily` counts organization calls by member, the platform's counts every call. Each
# upsert first adds up the rows that fall on the same rollup row (a batch of calls settled
# together, `metering.py`), so one statement never updates a row twice, and takes its rows in key
# order, so two batches cannot deadlock on them (`batch_sql.per_key`; a lone call's row is
# written as it is). Put them in a WITH after `settled`: the settle statement derives `settled`
# from the usage logs it closes, `bump` from parameters. One text for both, so the rollups cannot
# be counted one way at settle and another in the sweep.


@dataclass(frozen=True)
class _Rollup:
    """One read model's upsert: its rows' keys (column, expression over `settled`) and the
    counters each call adds to (column, how the calls add up: one call's share and COUNT or SUM)."""

    cte: str
    table: str
    keys: tuple[tuple[str, str], ...]
    counters: tuple[tuple[str, Total], ...]
    where: str = ""

    def upsert(self, *, many: bool) -> str:
        """The CTE: the batch's rows added up per key (`many`) or the lone call's row, inserted,
        or added to the row already there (`r`)."""
        columns = ", ".join(column for column, _ in self.keys + self.counters)
        select = per_key(
            [expr for _, expr in self.keys],
            [total for _, total in self.counters],
            "settled",
            many=many,
            where=self.where,
        )
        conflict = ", ".join(column for column, _ in self.keys)
        bumps = ", ".join(f"{column} = r.{column} + EXCLUDED.{column}" for column, _ in self.counters)
        return (
            f"{self.cte} AS (INSERT INTO {self.table} AS r ({columns}) {select}"
            f" ON CONFLICT ({conflict}) DO UPDATE SET {bumps} RETURNING 1)"
        )


_DAY = ("day", "ts AT TIME ZONE 'UTC'")
_CALLS = (("invocations", Total("1", COUNT)), ("tokens", Total("tokens")))
_STATUSES = (
    _CALLS[0],
    ("successes", Total("success")),
    ("errors", Total("error")),
    ("timeouts", Total("timeout")),
    ("cancelled", Total("cancelled")),
    _CALLS[1],
)
_SPLIT = (
    ("input_tokens", Total("COALESCE(input_tokens, 0)")),
    ("output_tokens", Total("COALESCE(output_tokens, 0)")),
)
_PERSONAL = "org_id IS NULL"

_PERSONAL_ROLLUPS = [
    _Rollup(
        "daily",
        "usage_daily",
        (("user_id", "user_id"), _DAY, ("tool_id", "tool_id"), ("plan_code", "plan_code")),
        _STATUSES + _SPLIT,
        _PERSONAL,
    ),
    _Rollup("user_daily", "usage_user_daily", (("user_id", "user_id"), _DAY), _CALLS, _PERSONAL),
    _Rollup(
        "user_weekly",
        "usage_user_weekly",
        (("user_id", "user_id"), ("week", "date_trunc('week', ts AT TIME ZONE 'UTC')")),
        _CALLS,
        _PERSONAL,
    ),
    _Rollup(
        "hourly",
        "usage_hourly",
        (("user_id", "user_id"), ("hour", "date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'")),
        _CALLS,
        _PERSONAL,
    ),
]

_ORG_ROLLUPS = [
    _Rollup(
        "org_daily",
        "usage_org_daily",
        (("org_id", "org_id"), _DAY, ("user_id", "user_id"), ("tool_id", "tool_id")),
        _STATUSES + _SPLIT,
        "org_id IS NOT NULL",
    ),
]

_PLATFORM_ROLLUPS = [
    _Rollup(
        "platform",
        "usage_platform_daily",
        (_DAY, ("tool_id", "tool_id"), ("plan_code", "plan_code"), ("shard", "shard")),
        _STATUSES,
    ),
]


def rollup_ctes(*, personal: bool = True, orgs: bool = True, many: bool = True) -> str:
    """The upserts as one list of CTEs. A batch with no personal call (`personal=False`) or no
    organization call (`orgs=False`) leaves out those read models' upserts: they could change
    nothing, and every part of a statement costs PostgreSQL its start-up. A lone call's
    (`many=False`) has nothing to add up or to order."""
    ctes = (_PERSONAL_ROLLUPS if personal else []) + (_ORG_ROLLUPS if orgs else []) + _PLATFORM_ROLLUPS
    return ",\n    ".join(cte.upsert(many=many) for cte in ctes) + "\n"


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

"""The read models behind summaries, timeseries and platform stats: daily and hourly rollups.

`bump` is called in the settle transaction of every invocation (the same transaction that
writes the usage log and charges the subscription), so rollups never drift from raw logs. Both
upserts go to the server as one statement.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_BUMP = text(
    """
    WITH daily AS (
        INSERT INTO usage_daily AS d
            (user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, tokens)
        VALUES (:user_id, CAST(:ts AS timestamptz) AT TIME ZONE 'UTC', :tool_id, :plan_code,
                1, :success, :error, :timeout, :tokens)
        ON CONFLICT (user_id, day, tool_id, plan_code) DO UPDATE SET
            invocations = d.invocations + 1,
            successes = d.successes + EXCLUDED.successes,
            errors = d.errors + EXCLUDED.errors,
            timeouts = d.timeouts + EXCLUDED.timeouts,
            tokens = d.tokens + EXCLUDED.tokens
        RETURNING 1
    )
    INSERT INTO usage_hourly AS h (user_id, hour, invocations, tokens)
    VALUES (:user_id, date_trunc('hour', CAST(:ts AS timestamptz) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
            1, :tokens)
    ON CONFLICT (user_id, hour) DO UPDATE SET
        invocations = h.invocations + 1,
        tokens = h.tokens + EXCLUDED.tokens
    """
)


async def bump(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    tool_id: uuid.UUID,
    plan_code: str | None,
    ts: datetime,
    status: str,
    tokens: int,
) -> None:
    """Count one settled invocation (status success/error/timeout) in the day and hour of `ts`."""
    await session.execute(
        _BUMP,
        {
            "user_id": user_id,
            "tool_id": tool_id,
            "plan_code": plan_code or "",
            "ts": ts,
            "success": int(status == "success"),
            "error": int(status == "error"),
            "timeout": int(status == "timeout"),
            "tokens": tokens,
        },
    )

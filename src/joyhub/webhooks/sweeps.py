"""The webhook domain's sweep jobs (run by `joyhub.ops.sweeper`): retention of what it keeps.

- events older than RETENTION (30 days) go, and their deliveries with them (foreign key
  cascade): "deliveries are kept 30 days" (API.md §11);
- notification emails older than RETENTION go;
- the quota thresholds fired in periods that are over go (a period's record is only needed
  while the period runs).

Each job deletes at most a batch per pass, so a pass stays short after a long outage too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.webhooks import policy

Job = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]
BATCH = 10_000

_OLD_EVENTS = text(
    """
    DELETE FROM webhook_events WHERE id IN (
        SELECT id FROM webhook_events WHERE created_at < :cutoff ORDER BY created_at LIMIT :batch)
    """
)
_OLD_EMAILS = text(
    """
    DELETE FROM notification_emails WHERE id IN (
        SELECT id FROM notification_emails WHERE created_at < :cutoff ORDER BY created_at LIMIT :batch)
    """
)
_PAST_ALERTS = text(
    """
    DELETE FROM quota_alerts AS qa USING subscriptions AS s
    WHERE s.id = qa.subscription_id AND qa.period_start < s.current_period_start
    """
)


async def _rows(session: AsyncSession, statement: TextClause, params: dict[str, object]) -> int:
    result = await session.execute(statement, params)
    return int(getattr(result, "rowcount", 0) or 0)


async def purge_events(session: AsyncSession, settings: Settings, now: datetime) -> int:
    return await _rows(session, _OLD_EVENTS, {"cutoff": now - policy.RETENTION, "batch": BATCH})


async def purge_emails(session: AsyncSession, settings: Settings, now: datetime) -> int:
    return await _rows(session, _OLD_EMAILS, {"cutoff": now - policy.RETENTION, "batch": BATCH})


async def purge_quota_alerts(session: AsyncSession, settings: Settings, now: datetime) -> int:
    return await _rows(session, _PAST_ALERTS, {})


def jobs() -> list[tuple[str, Job]]:
    return [
        ("webhook_events_retention", purge_events),
        ("notification_emails_retention", purge_emails),
        ("quota_alerts_past_periods", purge_quota_alerts),
    ]

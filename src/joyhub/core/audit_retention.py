"""Retention of the audit log (issue 18): AUDIT_RETENTION_DAYS, unset (the default) = forever.

An operator who must keep a bounded history (or must not keep one longer than some period)
sets it; the sweep then deletes entries older than that, at most BATCH per pass along the
`created_at` index, so a first pass over years of entries does not hold a long transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings

BATCH = 10_000

_OLD_ENTRIES = text(
    """
    DELETE FROM audit_logs WHERE id IN (
        SELECT id FROM audit_logs WHERE created_at < :cutoff ORDER BY created_at LIMIT :batch
        FOR UPDATE SKIP LOCKED)
    """
)


async def purge_audit_logs(session: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: entries older than AUDIT_RETENTION_DAYS go; nothing when it is unset."""
    if settings.audit_retention_days is None:
        return 0
    cutoff = now - timedelta(days=settings.audit_retention_days)
    result = await session.execute(_OLD_ENTRIES, {"cutoff": cutoff, "batch": BATCH})
    return int(getattr(result, "rowcount", 0) or 0)

"""Notification preferences (`/users/me/notifications`, API.md §11).

No row means the defaults (`quota_email` on, thresholds [80, 100]); the settle statement reads
the same defaults (`quota_alerts.py`), so a user who never opened the settings gets both.
New thresholds apply from the next settle on; one already fired this period does not fire again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.models import NotificationPreference
from joyhub.models.notification import DEFAULT_THRESHOLDS
from joyhub.webhooks.schemas import NotificationsOut


async def get_preferences(session: AsyncSession, user_id: uuid.UUID) -> NotificationsOut:
    row = await session.get(NotificationPreference, user_id)
    if row is None:
        return NotificationsOut(quota_email=True, thresholds=list(DEFAULT_THRESHOLDS))
    return NotificationsOut(quota_email=row.quota_email, thresholds=sorted(row.thresholds))


async def update_preferences(
    session: AsyncSession, user_id: uuid.UUID, changes: dict[str, Any], now: datetime
) -> NotificationsOut:
    """Change the fields sent, in one upsert: the defaults for the rest of a new row, and two
    concurrent PATCHes of different fields both stand."""
    inserted = {"quota_email": True, "thresholds": list(DEFAULT_THRESHOLDS), **changes, "updated_at": now}
    stmt = pg_insert(NotificationPreference).values(user_id=user_id, **inserted)
    row = (
        await session.execute(
            stmt.on_conflict_do_update(
                index_elements=[NotificationPreference.user_id], set_={**changes, "updated_at": now}
            ).returning(NotificationPreference.quota_email, NotificationPreference.thresholds)
        )
    ).one()
    return NotificationsOut(quota_email=row.quota_email, thresholds=sorted(row.thresholds))

"""Fan-out: every new event becomes one delivery per endpoint subscribed to it.

Writers only add an event row (`events.emit`, or the settle statement); here, in one short
transaction per batch, the dispatcher claims unfanned events (`FOR UPDATE SKIP LOCKED`, so
workers share the work), inserts their deliveries, marks them fanned out, and queues the quota
emails of `quota.threshold_reached` events whose user has `quota_email` on. Who receives what:

- a user's endpoints (`scope = 'user'`): the events of their own account, for the types they
  chose, while the account is active;
- an organization's endpoints (`scope = 'org'`): the events of the organization's subscription
  (API.md §13), while the organization exists; its quota emails go to its owners and admins;
- the platform's endpoints (`scope = 'admin'`): every account's events and the tool events, for
  the types they chose.

`webhook.test` events never come here: `POST …/test` creates its one delivery directly.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.webhooks import emails
from joyhub.webhooks.events import QUOTA_THRESHOLD_REACHED

BATCH = 500

_FAN_OUT = text(
    """
    WITH ev AS (
        SELECT id, type, user_id, org_id FROM webhook_events
        WHERE fanned_out_at IS NULL
        ORDER BY created_at LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), targets AS (
        SELECT ev.id AS event_id, e.id AS endpoint_id
        FROM ev
        JOIN webhook_endpoints AS e ON e.owner_id = ev.user_id AND e.scope = 'user'
        JOIN users AS u ON u.id = e.owner_id AND u.is_active
        WHERE e.is_active AND ev.type = ANY(e.events)
        UNION ALL
        SELECT ev.id, e.id
        FROM ev
        JOIN webhook_endpoints AS e ON e.org_id = ev.org_id AND e.scope = 'org'
        JOIN organizations AS o ON o.id = e.org_id AND o.deleted_at IS NULL
        WHERE e.is_active AND ev.type = ANY(e.events)
        UNION ALL
        SELECT ev.id, e.id
        FROM ev JOIN webhook_endpoints AS e ON e.scope = 'admin'
        WHERE e.is_active AND ev.type = ANY(e.events)
    ), ins AS (
        INSERT INTO webhook_deliveries
            (id, endpoint_id, event_id, status, attempts, next_attempt_at, created_at, updated_at)
        SELECT gen_random_uuid(), endpoint_id, event_id, 'pending', 0, :now, :now, :now FROM targets
        ON CONFLICT (endpoint_id, event_id) DO NOTHING
    ), done AS (
        UPDATE webhook_events AS w SET fanned_out_at = :now FROM ev WHERE w.id = ev.id
    )
    SELECT ev.id, ev.type FROM ev
    """
)

# the quota emails to queue: threshold events of active users with quota_email on (the default);
# an organization's go to its active owners and admins who have quota_email on (one email each,
# not tied to the event's id: the fan-out that queues them runs once per event)
_QUOTA_MAILS = text(
    """
    SELECT ev.id, ev.user_id, ev.data::text AS data, ev.created_at, u.email, false AS for_org
    FROM webhook_events AS ev
    JOIN users AS u ON u.id = ev.user_id AND u.is_active
    LEFT JOIN notification_preferences AS np ON np.user_id = ev.user_id
    WHERE ev.id = ANY(CAST(:ids AS uuid[])) AND COALESCE(np.quota_email, true)
    UNION ALL
    SELECT ev.id, u.id, ev.data::text, ev.created_at, u.email, true
    FROM webhook_events AS ev
    JOIN organizations AS o ON o.id = ev.org_id AND o.deleted_at IS NULL
    JOIN organization_members AS m ON m.org_id = ev.org_id AND m.role IN ('owner', 'admin')
    JOIN users AS u ON u.id = m.user_id AND u.is_active
    LEFT JOIN notification_preferences AS np ON np.user_id = u.id
    WHERE ev.id = ANY(CAST(:ids AS uuid[])) AND ev.org_id IS NOT NULL AND COALESCE(np.quota_email, true)
    """
)


async def fan_out(engine: AsyncEngine, *, now: datetime, limit: int = BATCH) -> int:
    """Fan out one batch of new events; return how many events it took (0: none left)."""
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        events = (await session.execute(_FAN_OUT, {"now": now, "limit": limit})).all()
        quota = [e.id for e in events if e.type == QUOTA_THRESHOLD_REACHED]
        if quota:
            for row in (await session.execute(_QUOTA_MAILS, {"ids": quota})).all():
                subject, body = emails.quota_threshold(json.loads(row.data), row.created_at)
                emails.queue(
                    session,
                    kind="quota_threshold",
                    user_id=row.user_id,
                    recipient=row.email,
                    subject=subject,
                    body=body,
                    now=now,
                    event_id=None if row.for_org else row.id,
                )
    return len(events)


async def fan_out_all(engine: AsyncEngine, *, now: datetime) -> int:
    """Fan out every event waiting; return how many."""
    total = 0
    while taken := await fan_out(engine, now=now):
        total += taken
        if taken < BATCH:
            break
    return total

"""The delivery queue: claim due deliveries, record attempts, disable endpoints that keep failing.

- `claim`: up to N due `pending` deliveries of active endpoints, locked with `FOR UPDATE SKIP
  LOCKED` (so every worker and instance can claim at once without waiting on each other), their
  attempt counted and `next_attempt_at` pushed a lease ahead, committed at once: no row lock or
  transaction is held during the HTTP attempt.
- `record`: the outcomes of many attempts in one statement; a success clears the endpoint's
  `failing_since`, a failure sets it if unset — so an endpoint that is healthy or already known
  to be failing costs no endpoint write. Endpoints whose failures have lasted DISABLE_AFTER are
  then disabled in the same transaction (`disable`): their pending deliveries fail, and their
  owner is emailed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from joyhub.core import metrics
from joyhub.models import User, WebhookDelivery, WebhookEndpoint
from joyhub.webhooks import emails, policy

log = logging.getLogger("joyhub.webhooks")


@dataclass(frozen=True)
class Claimed:
    """A delivery claimed for one attempt, with what the attempt needs."""

    id: uuid.UUID
    attempts: int  # including this one
    endpoint_id: uuid.UUID
    url: str
    secret: bytes
    previous_secret: bytes | None
    previous_secret_expires_at: datetime | None
    event_id: uuid.UUID
    event_type: str
    event_created_at: datetime
    event_data: str  # the event's data as JSON text


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to (`status` is the delivery's status after it)."""

    delivery_id: uuid.UUID
    status: str  # succeeded | pending (to be retried) | failed (schedule spent)
    status_code: int | None
    error: str | None
    next_attempt_at: datetime | None


_CLAIM = text(
    """
    WITH due AS (
        SELECT d.id FROM webhook_deliveries AS d
        JOIN webhook_endpoints AS e ON e.id = d.endpoint_id AND e.is_active
        WHERE d.status = 'pending' AND d.next_attempt_at <= :now
        ORDER BY d.next_attempt_at
        LIMIT :limit
        FOR UPDATE OF d SKIP LOCKED
    ), claimed AS (
        UPDATE webhook_deliveries AS d
        SET attempts = d.attempts + 1, next_attempt_at = :lease_until, updated_at = :now
        FROM due WHERE d.id = due.id
        RETURNING d.id, d.endpoint_id, d.event_id, d.attempts
    )
    SELECT c.id, c.attempts, c.endpoint_id, e.url, e.secret, e.previous_secret,
           e.previous_secret_expires_at, c.event_id, ev.type AS event_type,
           ev.created_at AS event_created_at, ev.data::text AS event_data
    FROM claimed AS c
    JOIN webhook_endpoints AS e ON e.id = c.endpoint_id
    JOIN webhook_events AS ev ON ev.id = c.event_id
    """
)


async def claim(engine: AsyncEngine, *, now: datetime, limit: int) -> list[Claimed]:
    async with engine.begin() as conn:
        rows = (
            await conn.execute(_CLAIM, {"now": now, "lease_until": now + policy.CLAIM_LEASE, "limit": limit})
        ).all()
    return [Claimed(**row._asdict()) for row in rows]


_NEXT_DUE = text("SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status = 'pending'")


async def next_due(conn: AsyncConnection) -> datetime | None:
    """When the earliest pending delivery is due (claimed ones: when their lease ends)."""
    value: datetime | None = (await conn.execute(_NEXT_DUE)).scalar()
    return value


_QUEUE = text(
    """
    SELECT count(*) AS depth, min(created_at) AS oldest
    FROM webhook_deliveries WHERE status = 'pending'
    """
)


async def refresh_gauges(conn: AsyncConnection, now: datetime) -> None:
    """Queue depth and the age of the oldest pending delivery, for /metrics."""
    row = (await conn.execute(_QUEUE)).one()
    metrics.WEBHOOK_QUEUE_DEPTH.set(row.depth)
    age = (now - row.oldest).total_seconds() if row.oldest is not None else 0.0
    metrics.WEBHOOK_OLDEST_PENDING_SECONDS.set(max(age, 0.0))


_RECORD = text(
    """
    WITH r AS (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]), CAST(:codes AS int[]),
                             CAST(:errors AS text[]), CAST(:next_at AS timestamptz[]))
                 AS r(id, status, code, error, next_at)
    ), upd AS (
        UPDATE webhook_deliveries AS d
        SET status = r.status, last_status_code = r.code, last_error = r.error,
            next_attempt_at = r.next_at, updated_at = :now
        FROM r WHERE d.id = r.id AND d.status = 'pending'
        RETURNING d.endpoint_id, r.status = 'succeeded' AS ok
    ), ep AS (
        SELECT endpoint_id, bool_or(ok) AS any_ok FROM upd GROUP BY endpoint_id
    ), healed AS (
        UPDATE webhook_endpoints AS e SET failing_since = NULL
        FROM ep WHERE e.id = ep.endpoint_id AND ep.any_ok AND e.failing_since IS NOT NULL
    ), failing AS (
        UPDATE webhook_endpoints AS e SET failing_since = :now
        FROM ep WHERE e.id = ep.endpoint_id AND NOT ep.any_ok AND e.failing_since IS NULL
    )
    SELECT e.id FROM webhook_endpoints AS e JOIN ep ON e.id = ep.endpoint_id
    WHERE NOT ep.any_ok AND e.is_active AND e.failing_since <= :disable_before
    """
)


async def record(engine: AsyncEngine, outcomes: list[Outcome], *, now: datetime) -> list[uuid.UUID]:
    """Write many attempts' outcomes at once; disable the endpoints past the failure window.

    Returns the endpoints disabled. A delivery no longer pending (its endpoint was deleted or
    disabled meanwhile) is left as it is.
    """
    if not outcomes:
        return []
    params = {
        "ids": [o.delivery_id for o in outcomes],
        "statuses": [o.status for o in outcomes],
        "codes": [o.status_code for o in outcomes],
        "errors": [o.error for o in outcomes],
        "next_at": [o.next_attempt_at for o in outcomes],
        "now": now,
        "disable_before": now - policy.DISABLE_AFTER,
    }
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        expired = list((await session.execute(_RECORD, params)).scalars())
        if expired:
            days = policy.DISABLE_AFTER.days
            await disable(session, expired, reason=f"every delivery failed for {days} days", now=now)
    return expired


async def disable(
    session: AsyncSession, endpoint_ids: list[uuid.UUID], *, reason: str, now: datetime
) -> None:
    """Disable endpoints (their pending deliveries fail) and email each owner, in this transaction."""
    rows = (
        await session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id.in_(endpoint_ids), WebhookEndpoint.is_active.is_(True))
            .values(is_active=False, disabled_reason=reason, updated_at=now)
            .returning(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.owner_id)
        )
    ).all()
    for endpoint_id, url, owner_id in rows:
        await fail_pending(session, endpoint_id, reason="endpoint disabled", now=now)
        owner = (await session.execute(select(User.email).where(User.id == owner_id))).scalar_one()
        subject, body = emails.endpoint_disabled(url, reason)
        emails.queue(
            session,
            kind="webhook_disabled",
            user_id=owner_id,
            recipient=owner,
            subject=subject,
            body=body,
            now=now,
        )
        log.warning("webhook endpoint disabled", extra={"endpoint_id": str(endpoint_id), "reason": reason})


async def fail_pending(session: AsyncSession, endpoint_id: uuid.UUID, *, reason: str, now: datetime) -> None:
    """The endpoint's pending deliveries will not be attempted: mark them failed (they can be
    retried by hand once the endpoint is enabled again)."""
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
        .values(status="failed", last_error=reason, next_attempt_at=None, updated_at=now)
    )

"""Notification emails: decided in a transaction, sent after it commits (an email outbox).

A quota threshold (queued when its event is fanned out, `outbox.py`) and an endpoint disabled
after days of failures (`deliveries.py`) each add a row to `notification_emails` in the
transaction that decides them; the dispatcher sends the due rows through the configured email
backend (`core/email.py`) and retries a failing mail server a few times. So a rolled-back
change sends nothing, a mail-server outage loses nothing, and two workers never send one row
twice (rows are claimed with `FOR UPDATE SKIP LOCKED` and a lease, like deliveries).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.email import EmailSender, OutgoingEmail, deliver
from joyhub.models import NotificationEmail

log = logging.getLogger("joyhub.webhooks.emails")

# after the first try: a mail server that is down for a while still gets the message
RETRY_DELAYS = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2))
CLAIM_LEASE = timedelta(minutes=2)  # longer than an SMTP send may take (core.email's timeout)


def queue(
    session: AsyncSession,
    *,
    kind: str,
    user_id: uuid.UUID,
    recipient: str,
    subject: str,
    body: str,
    now: datetime,
    event_id: uuid.UUID | None = None,
) -> None:
    """Add an email to the transaction; the dispatcher sends it once the transaction commits."""
    session.add(
        NotificationEmail(
            id=uuid.uuid4(),
            kind=kind,
            user_id=user_id,
            event_id=event_id,
            recipient=recipient,
            subject=subject[:200],
            body=body,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def quota_threshold(data: dict[str, Any], at: datetime) -> tuple[str, str]:
    """Subject and plain-text body of a `quota.threshold_reached` email."""
    threshold = int(data["threshold"])
    used, limit = int(data["tokens_used"]), int(data["token_limit"])
    resets = datetime.fromisoformat(str(data["period_end"]).replace("Z", "+00:00"))
    if threshold >= 100:
        subject = "You have used all of your Joyfull UI Hub tokens for this period"
        consequence = "Tool invocations are refused until then. Upgrade your plan to continue at once.\n\n"
    else:
        subject = f"You have used {threshold}% of your Joyfull UI Hub tokens for this period"
        consequence = ""
    body = (
        "Hello,\n\n"
        f"Your Joyfull UI Hub subscription has used {threshold}% of its token quota for the current "
        f"period: {used:,} of {limit:,} tokens, as of {_when(at)}.\n\n"
        f"Your quota resets on {_when(resets)}, when the next period begins.\n"
        f"{consequence}\n"
        "You can choose the thresholds of these alerts, or turn the emails off, in your "
        "notification settings.\n"
    )
    return subject, body


def endpoint_disabled(url: str, reason: str) -> tuple[str, str]:
    """Subject and plain-text body of the email to an endpoint's owner when it is disabled."""
    subject = "A Joyfull UI Hub webhook endpoint was disabled"
    body = (
        "Hello,\n\n"
        f"Your webhook endpoint {url} was disabled: {reason}.\n\n"
        "Events are no longer sent to it. Once the receiver works again, enable the endpoint "
        "(PATCH it with is_active: true) and retry the failed deliveries you need.\n"
    )
    return subject, body


@dataclass(frozen=True)
class _Due:
    id: uuid.UUID
    kind: str
    recipient: str
    subject: str
    body: str
    attempts: int


_CLAIM = text(
    """
    UPDATE notification_emails AS m
    SET attempts = m.attempts + 1, next_attempt_at = CAST(:lease_until AS timestamptz)
    WHERE m.id IN (
        SELECT id FROM notification_emails
        WHERE status = 'pending' AND next_attempt_at <= :now
        ORDER BY next_attempt_at LIMIT :limit
        FOR UPDATE SKIP LOCKED)
    RETURNING m.id, m.kind, m.recipient, m.subject, m.body, m.attempts
    """
)

_SENT = text(
    "UPDATE notification_emails SET status = 'sent', sent_at = :now, next_attempt_at = NULL WHERE id = :id"
)
_FAILED = text(
    """
    UPDATE notification_emails
    SET status = CASE WHEN CAST(:retry_at AS timestamptz) IS NULL THEN 'failed' ELSE 'pending' END,
        next_attempt_at = :retry_at
    WHERE id = :id
    """
)


async def send_due(engine: AsyncEngine, sender: EmailSender, *, limit: int = 20) -> int:
    """Send the emails that are due (claimed first, so no other worker sends them); how many."""
    now = utcnow()
    async with engine.begin() as conn:
        rows = (
            await conn.execute(_CLAIM, {"now": now, "lease_until": now + CLAIM_LEASE, "limit": limit})
        ).all()
    due = [_Due(r.id, r.kind, r.recipient, r.subject, r.body, r.attempts) for r in rows]
    for mail in due:
        sent = await deliver(sender, OutgoingEmail(mail.recipient, mail.subject, mail.body, kind=mail.kind))
        metrics.NOTIFICATION_EMAILS.labels(mail.kind, "sent" if sent else "failed").inc()
        done = utcnow()
        async with engine.begin() as conn:
            if sent:
                await conn.execute(_SENT, {"id": mail.id, "now": done})
            else:
                retry_at = (
                    done + RETRY_DELAYS[mail.attempts - 1] if mail.attempts <= len(RETRY_DELAYS) else None
                )
                await conn.execute(_FAILED, {"id": mail.id, "retry_at": retry_at})
                if retry_at is None:
                    log.warning(
                        "notification email given up",
                        extra={"email_kind": mail.kind, "attempts": mail.attempts},
                    )
    return len(due)

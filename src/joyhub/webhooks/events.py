"""The events of API.md §11 and how a change writes one into the outbox.

`emit` adds an event row to the caller's session, so it is flushed and committed with the change
it reports — or rolled back with it: no event without its change, no change without its event.
The quota threshold events are the exception in form, not in kind: the settle statement writes
them itself (`quota_alerts.py`), because that statement is the settle's whole transaction.

Event ids are shown as `evt_` and the row's UUID in hex; the same id is the `webhook-id` of every
delivery of the event, retries included, so receivers can use it to drop duplicates.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.models import WebhookEvent

EVENT_ID_PREFIX = "evt_"
# NOTIFYed when an event commits (the trigger of migration 0010) or a delivery is due by hand
NOTIFY_CHANNEL = "joyhub_webhooks"

QUOTA_THRESHOLD_REACHED = "quota.threshold_reached"
QUOTA_PERIOD_RESET = "quota.period_reset"
SUBSCRIPTION_CREATED = "subscription.created"
SUBSCRIPTION_UPGRADED = "subscription.upgraded"
SUBSCRIPTION_DOWNGRADE_SCHEDULED = "subscription.downgrade_scheduled"
SUBSCRIPTION_CANCELLED = "subscription.cancelled"
SUBSCRIPTION_RESUMED = "subscription.resumed"
SUBSCRIPTION_RENEWED = "subscription.renewed"
SUBSCRIPTION_ENDED = "subscription.ended"
SUBSCRIPTION_EXPIRED = "subscription.expired"
TOOL_CIRCUIT_OPENED = "tool.circuit_opened"
TOOL_CIRCUIT_CLOSED = "tool.circuit_closed"
WEBHOOK_TEST = "webhook.test"

# what a user's endpoint may subscribe to (its own account's events)
USER_EVENT_TYPES = (
    QUOTA_THRESHOLD_REACHED,
    QUOTA_PERIOD_RESET,
    SUBSCRIPTION_CREATED,
    SUBSCRIPTION_UPGRADED,
    SUBSCRIPTION_DOWNGRADE_SCHEDULED,
    SUBSCRIPTION_CANCELLED,
    SUBSCRIPTION_RESUMED,
    SUBSCRIPTION_RENEWED,
    SUBSCRIPTION_ENDED,
    SUBSCRIPTION_EXPIRED,
)
# what an admin (platform) endpoint may subscribe to: every user's events, and the tools'
ADMIN_EVENT_TYPES = (*USER_EVENT_TYPES, TOOL_CIRCUIT_OPENED, TOOL_CIRCUIT_CLOSED)


def public_id(event_id: uuid.UUID) -> str:
    return EVENT_ID_PREFIX + event_id.hex


def emit(
    session: AsyncSession,
    event_type: str,
    *,
    user_id: uuid.UUID | None,
    data: dict[str, Any],
    now: datetime,
    endpoint_id: uuid.UUID | None = None,
    org_id: uuid.UUID | None = None,
) -> WebhookEvent:
    """Add an event to the session's transaction (the outbox); the dispatcher does the rest."""
    event = WebhookEvent(
        id=uuid.uuid4(),
        type=event_type,
        user_id=user_id,
        endpoint_id=endpoint_id,
        org_id=org_id,
        data=data,
        created_at=now,
        fanned_out_at=None,
    )
    session.add(event)
    return event


def circuit_data(tool_id: uuid.UUID, tool_name: str, consecutive_failures: int) -> dict[str, Any]:
    """`tool.circuit_*`: `{tool_id, tool_name, consecutive_failures}`."""
    return {"tool_id": str(tool_id), "tool_name": tool_name, "consecutive_failures": consecutive_failures}

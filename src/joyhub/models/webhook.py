"""Webhooks (API.md §11): endpoints, the event outbox, and one delivery per (endpoint, event).

- `webhook_events` is the transactional outbox: a row is written in the same transaction as the
  change it reports (or, for quota thresholds, in the settle statement itself). The dispatcher
  fans each new event out to the endpoints subscribed to it (`fanned_out_at` set in the same
  transaction as the deliveries it creates), so writers never need to know about endpoints.
- `webhook_deliveries` is the work queue: `pending` rows with `next_attempt_at` due are claimed
  with `FOR UPDATE SKIP LOCKED` by any worker; a claim pushes `next_attempt_at` forward by a
  lease, so a worker that dies mid-delivery only delays the retry.
- An endpoint's signing secrets are stored encrypted (`webhooks/secrets.py`); during a rotation
  the previous one still signs until `previous_secret_expires_at`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base, Timestamps, UUIDPk

ENDPOINT_SCOPES = ("user", "admin", "org")
DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class WebhookEndpoint(UUIDPk, Timestamps, Base):
    """A URL that receives signed events: a user's own (`scope = 'user'`, that user's events), an
    organization's (`scope = 'org'`, `org_id`: the organization's subscription events, managed by
    its admins, API.md §13) or a platform one managed by admins (`scope = 'admin'`, every
    account's events and tool events)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint("scope IN ('user', 'admin', 'org')", name="scope"),
        Index(
            "ix_webhook_endpoints_org_created", "org_id", "created_at", postgresql_where="org_id IS NOT NULL"
        ),
        Index("ix_webhook_endpoints_owner_created", "owner_id", "created_at"),
        Index("ix_webhook_endpoints_admin", "created_at", postgresql_where="scope = 'admin'"),
    )

    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    scope: Mapped[str] = mapped_column(String(8), default="user")
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    description: Mapped[str | None] = mapped_column(String(500))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(300))
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    previous_secret: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_expires_at: Mapped[datetime | None]
    # the first failed attempt since the last success; the endpoint is disabled when it is old
    failing_since: Mapped[datetime | None]
    org_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))


class WebhookEvent(Base):
    """The outbox: one row per event; `user_id` is whose account it concerns (null for the tool
    events, which only admin endpoints receive); `endpoint_id` only for `webhook.test`."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_created_at", "created_at"),
        Index("ix_webhook_events_unfanned", "created_at", postgresql_where="fanned_out_at IS NULL"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    fanned_out_at: Mapped[datetime | None]
    # the organization whose subscription the event concerns (then `user_id` is null)
    org_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))


class WebhookDelivery(UUIDPk, Base):
    """One event to one endpoint, with its attempts so far and when the next one is due."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status"),
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        Index("ix_webhook_deliveries_event", "event_id"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where="status = 'pending'"),
    )

    endpoint_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

"""Notification preferences, the quota thresholds already fired, and the email outbox (API.md §11).

- `notification_preferences`: one row per user who changed the defaults (no row means
  `quota_email` on and thresholds [80, 100]).
- `quota_alerts`: the thresholds fired per subscription and period. Its primary key is what makes
  a threshold fire at most once per period even when the plan's limit or the user's thresholds
  change mid-period; the settle statement inserts into it with `ON CONFLICT DO NOTHING`.
- `notification_emails`: emails decided in a transaction (a quota threshold, an endpoint
  disabled) and sent after it commits by the dispatcher, with retries, so a mail-server outage
  loses nothing and a rolled-back change sends nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base, UUIDPk

DEFAULT_THRESHOLDS = (80, 100)


class NotificationPreference(Base):
    __tablename__ = "notification_preferences"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    quota_email: Mapped[bool] = mapped_column(Boolean, default=True)
    thresholds: Mapped[list[int]] = mapped_column(ARRAY(SmallInteger))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class QuotaAlert(Base):
    __tablename__ = "quota_alerts"
    __table_args__ = (
        PrimaryKeyConstraint("subscription_id", "period_start", "threshold", name="pk_quota_alerts"),
    )

    subscription_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"))
    period_start: Mapped[datetime]
    threshold: Mapped[int] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NotificationEmail(UUIDPk, Base):
    __tablename__ = "notification_emails"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status"),
        Index("ix_notification_emails_due", "next_attempt_at", postgresql_where="status = 'pending'"),
        Index("ix_notification_emails_created_at", "created_at"),
    )

    kind: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # the event it reports, if any: one email per event, however often a fan-out is retried
    event_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]

"""One subscription row per user or organization; its limit is read from the plan so plan edits apply at once.

`tokens_reserved` and `inflight` count calls admitted but not yet settled, so concurrent
admissions at the quota edge see the tokens still in flight (API.md §5, guarantee 3).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.models.base import Base, Timestamps, UUIDPk

STATUSES = ("active", "cancelled", "expired")


class Subscription(UUIDPk, Timestamps, Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'cancelled', 'expired')", name="status"),
        CheckConstraint("tokens_used >= 0", name="tokens_used_nonnegative"),
        CheckConstraint("tokens_reserved >= 0", name="tokens_reserved_nonnegative"),
        Index("ix_subscriptions_status_period_end", "status", "current_period_end"),
        # a subscription belongs to a user or to an organization (API.md §13), never both
        CheckConstraint("(user_id IS NULL) <> (org_id IS NULL)", name="one_owner"),
    )

    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    org_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), unique=True
    )
    plan_code: Mapped[str] = mapped_column(ForeignKey("plans.code"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    inflight: Mapped[int] = mapped_column(Integer, default=0)
    current_period_start: Mapped[datetime]
    current_period_end: Mapped[datetime]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    scheduled_plan_code: Mapped[str | None] = mapped_column(ForeignKey("plans.code"))
    expires_at: Mapped[datetime | None]
    # the GCRA state of the plan's requests_per_minute (API.md §4.1): the theoretical arrival
    # time of the next request
    rate_tat: Mapped[datetime | None]

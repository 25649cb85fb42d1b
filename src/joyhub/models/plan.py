"""Plans are data that admins edit: limits and prices live here and nowhere else."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.models.base import Base, Timestamps


class Plan(Timestamps, Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("price_cents >= 0", name="price_nonnegative"),
        CheckConstraint("token_limit >= 0", name="token_limit_nonnegative"),
        CheckConstraint("period_days >= 1", name="period_positive"),
        CheckConstraint(
            "(requests_per_minute IS NULL OR requests_per_minute >= 1)"
            " AND (max_concurrent IS NULL OR max_concurrent >= 1)",
            name="limits_positive",
        ),
    )

    code: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    price_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    token_limit: Mapped[int] = mapped_column(BigInteger)
    period_days: Mapped[int] = mapped_column(Integer, default=30)
    features: Mapped[list[str]] = mapped_column(JSONB, default=list)
    rank: Mapped[int] = mapped_column(Integer, unique=True)
    # how fast (API.md §4.1): requests a minute per subscription, and calls running at once;
    # null is no limit
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)

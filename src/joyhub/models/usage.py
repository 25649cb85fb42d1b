"""Usage: one raw log row per admitted invocation, daily rollups, and idempotency records.

A log row is written `pending` at admission and settled (success/error/timeout) in the same
transaction that charges the subscription and bumps the rollup. `timestamp` is the settle time,
so a subscription's `tokens_used` always equals the sum of its current period's logs.

`usage_logs` is partitioned by month on `started_at` (migration 0013, `usage/partitions.py`):
the admission time, the one timestamp a row never changes, so a row never moves between
partitions. Its primary key is therefore `(id, started_at)`, and every statement that names a
log by id also names its `started_at`, so PostgreSQL only opens the partition it lives in.
Nothing may reference a log by foreign key (a partition is dropped whole when it retires).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base, UUIDPk

USAGE_STATUSES = ("pending", "success", "error", "timeout", "cancelled")
TOKEN_SOURCES = ("reported", "estimated")


class UsageLog(Base):
    __tablename__ = "usage_logs"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'success', 'error', 'timeout', 'cancelled')", name="status"),
        CheckConstraint("token_source IN ('reported', 'estimated')", name="token_source"),
        Index("ix_usage_logs_user_ts", "user_id", "timestamp"),
        Index("ix_usage_logs_pending", "started_at", postgresql_where="status = 'pending'"),
        Index("ix_usage_logs_org_ts", "org_id", "timestamp", postgresql_where="org_id IS NOT NULL"),
        {"postgresql_partition_by": "RANGE (started_at)"},
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # the admission time: the partition key, part of the primary key, never updated
    started_at: Mapped[datetime] = mapped_column(primary_key=True, default=utcnow)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    tool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tools.id"))
    subscription_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="SET NULL")
    )
    plan_code: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    timestamp: Mapped[datetime] = mapped_column(default=utcnow)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    # where `tokens_used` came from: the upstream's own count, or the hub's estimate (API.md §5.1)
    token_source: Mapped[str] = mapped_column(String(16), default="estimated", server_default="estimated")
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(128))
    error_code: Mapped[str | None] = mapped_column(String(64))
    # the upstream's reported prompt / completion tokens (API.md §12); null when not reported
    input_tokens: Mapped[int | None] = mapped_column(BigInteger)
    output_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # the organization the call billed (API.md §13); null for a personal call. No foreign key on
    # purpose: its check would take a KEY SHARE lock on the organization's one row in every
    # admission of every member (a multixact on the hottest row of a busy organization). The
    # admission writes it from the membership it has just read, and organizations are never
    # deleted for real (soft delete: their history stays).
    org_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class UsageDaily(Base):
    """Per-day rollup (user, tool, plan, day): what summaries, timeseries and stats read."""

    __tablename__ = "usage_daily"
    __table_args__ = (
        PrimaryKeyConstraint("user_id", "day", "tool_id", "plan_code", name="pk_usage_daily"),
        Index("ix_usage_daily_day", "day"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    tool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tools.id"))
    plan_code: Mapped[str] = mapped_column(String(32), default="")
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    timeouts: Mapped[int] = mapped_column(BigInteger, default=0)
    cancelled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_limited: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # refusals, §4.1
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # API.md §12
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageHourly(Base):
    """Per-hour rollup per user (all tools): what the hourly timeseries reads."""

    __tablename__ = "usage_hourly"
    __table_args__ = (PrimaryKeyConstraint("user_id", "hour", name="pk_usage_hourly"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    hour: Mapped[datetime]
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageUserDaily(Base):
    """Per-day rollup per user, all tools (migration 0003): what platform stats' active users and
    top users read — a third of `usage_daily`'s rows, since the tool and plan are dropped."""

    __tablename__ = "usage_user_daily"
    __table_args__ = (
        PrimaryKeyConstraint("user_id", "day", name="pk_usage_user_daily"),
        Index("ix_usage_user_daily_day", "day"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageUserWeekly(Base):
    """Per-week rollup per user (weeks start on Monday, UTC; migration 0003): platform stats read
    whole weeks from here and only the ragged days at the ends of a range from
    `usage_user_daily`, a third of the rows for 30 days and a seventh for a year."""

    __tablename__ = "usage_user_weekly"
    __table_args__ = (
        PrimaryKeyConstraint("user_id", "week", name="pk_usage_user_weekly"),
        Index("ix_usage_user_weekly_week", "week"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    week: Mapped[date] = mapped_column(Date)
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


PLATFORM_SHARDS = 16


class UsagePlatformDaily(Base):
    """Platform-wide per-day rollup by tool and plan (migration 0003): what platform stats'
    totals, by-status, by-tool, by-plan and daily series read. Each (day, tool, plan) is spread
    over PLATFORM_SHARDS rows by the user's id (its low 4 bits), so concurrent settles of
    different users rarely wait on the same row lock."""

    __tablename__ = "usage_platform_daily"
    __table_args__ = (
        PrimaryKeyConstraint("day", "tool_id", "plan_code", "shard", name="pk_usage_platform_daily"),
    )

    day: Mapped[date] = mapped_column(Date)
    tool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tools.id"))
    plan_code: Mapped[str] = mapped_column(String(32), default="")
    shard: Mapped[int] = mapped_column(SmallInteger)
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    timeouts: Mapped[int] = mapped_column(BigInteger, default=0)
    cancelled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_limited: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # refusals, §4.1
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageOrgDaily(Base):
    """Per-day rollup of organization calls (org, UTC day, member, tool): what an organization's
    summaries, timeseries and per-member breakdown read (API.md §13). Personal rollups count
    personal calls only."""

    __tablename__ = "usage_org_daily"
    __table_args__ = (PrimaryKeyConstraint("org_id", "day", "user_id", "tool_id", name="pk_usage_org_daily"),)

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    tool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tools.id"))
    invocations: Mapped[int] = mapped_column(BigInteger, default=0)
    successes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    timeouts: Mapped[int] = mapped_column(BigInteger, default=0)
    cancelled: Mapped[int] = mapped_column(BigInteger, default=0)
    # refusals by a rate or concurrency limit (API.md §4.1), counted at admission (migration 0015)
    rate_limited: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # API.md §12
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class UsageRetirement(Base):
    """A month of raw usage logs that retention dropped (`usage/retention.py`): what history and
    export tell a caller asking for it, and the operator's record of what went where."""

    __tablename__ = "usage_retirements"

    month: Mapped[date] = mapped_column(Date, primary_key=True)
    rows: Mapped[int] = mapped_column(BigInteger)
    archive_path: Mapped[str | None] = mapped_column(String(1024))
    retired_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(UUIDPk, Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),
        Index("ix_idempotency_keys_expires_at", "expires_at"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    tool_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tools.id"))
    # the settled call's log; no foreign key: logs live in monthly partitions that retire whole,
    # and a key (kept for a day) never outlives the log it names in practice
    usage_log_id: Mapped[uuid.UUID | None]
    state: Mapped[str] = mapped_column(String(16), default="in_flight")
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]

"""API keys for scripts: only the SHA-256 of the key is stored; the prefix is for display."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base, UUIDPk


class ApiKey(UUIDPk, Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        Index("ix_api_keys_user_created", "user_id", "created_at"),
        Index("ix_api_keys_org_created", "org_id", "created_at", postgresql_where="org_id IS NOT NULL"),
        CheckConstraint(
            "requests_per_minute IS NULL OR requests_per_minute >= 1", name="requests_per_minute_positive"
        ),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    key_prefix: Mapped[str] = mapped_column(String(12))
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # the key's own limit, below its plan's (API.md §4.1), and its GCRA state
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    rate_tat: Mapped[datetime | None]
    # an organization's key (API.md §13): it bills the organization, and holds only while its
    # user is a member of it (the credential rule checks the membership)
    org_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))

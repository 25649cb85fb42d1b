"""Teams (API.md §13): organizations, their members with roles and per-member token limits, and
invitations by email.

An organization owns at most one subscription (`subscriptions.org_id`; the ledger is keyed by
subscription, so an organization's calls are metered exactly like a person's) and any number of
API keys (`api_keys.org_id`: the key of the member who made it, billing the organization).

A member's `tokens_used` counts their organization calls in the organization subscription's
period that ends at `period_end`; when the subscription has rolled into a later period the count
reads as 0 and restarts at the next charge (no rollover job has to visit every member). The
counters are written only under the organization subscription's row lock (admission and settle
lock the subscription first, then the member), so they are exact across processes like the quota.

An organization is deleted softly (`deleted_at`): its usage history stays for platform admins.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from joyhub.core.clock import utcnow
from joyhub.models.base import Base, Timestamps, UUIDPk

ORG_ROLES = ("owner", "admin", "member")


class Organization(UUIDPk, Timestamps, Base):
    __tablename__ = "organizations"
    __table_args__ = (Index("ix_organizations_created_at", "created_at"),)

    name: Mapped[str] = mapped_column(String(100))
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    deleted_at: Mapped[datetime | None]


class OrganizationMember(Base):
    __tablename__ = "organization_members"
    __table_args__ = (
        CheckConstraint("role IN ('owner', 'admin', 'member')", name="role"),
        CheckConstraint("token_limit IS NULL OR token_limit >= 0", name="token_limit_nonnegative"),
        CheckConstraint("tokens_used >= 0", name="tokens_used_nonnegative"),
        CheckConstraint("tokens_reserved >= 0", name="tokens_reserved_nonnegative"),
        Index("ix_organization_members_user_id", "user_id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), default="member")
    token_limit: Mapped[int | None] = mapped_column(BigInteger)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    # the end of the organization subscription period `tokens_used` counts in
    period_end: Mapped[datetime | None]
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)


class OrganizationInvitation(UUIDPk, Base):
    """A single-use invitation: only the SHA-256 of its token is stored."""

    __tablename__ = "organization_invitations"
    __table_args__ = (
        CheckConstraint("role IN ('owner', 'admin', 'member')", name="role"),
        Index("ix_organization_invitations_org_created", "org_id", "created_at"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(16), default="member")
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    invited_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    accepted_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

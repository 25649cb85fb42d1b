"""Invitations by email (API.md §13): single-use, valid 7 days, for the invited email only.

The token is shown once, in the email's link (`ORG_INVITE_URL`), and stored only as its SHA-256,
looked up through a unique index. Accepting locks the invitation row, so one token admits one
person once however many requests race with it. An unknown, expired, revoked or already used
token answers 404 alike (nothing tells which); a token for another email answers 403.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.core.email import OutgoingEmail
from joyhub.core.errors import Conflict, Forbidden, NotFound
from joyhub.core.security import new_opaque_token, token_digest
from joyhub.models import Organization, OrganizationInvitation, OrganizationMember, User
from joyhub.orgs import service
from joyhub.orgs.schemas import InvitationOut, OrganizationOut
from joyhub.orgs.service import Membership

INVITATION_TTL = timedelta(days=7)
MAX_PENDING = 100


def _out(inv: OrganizationInvitation) -> InvitationOut:
    return InvitationOut(
        id=inv.id,
        email=inv.email,
        role=inv.role,  # type: ignore[arg-type]  # a checked column
        expires_at=inv.expires_at,
        created_at=inv.created_at,
    )


def _pending(org_id: uuid.UUID, now: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        OrganizationInvitation.org_id == org_id,
        OrganizationInvitation.accepted_at.is_(None),
        OrganizationInvitation.revoked_at.is_(None),
        OrganizationInvitation.expires_at > now,
    )


async def create(
    session: AsyncSession, m: Membership, email: str, role: str, settings: Settings, now: datetime
) -> tuple[InvitationOut, OutgoingEmail]:
    """Invite `email` as `role` (admin+; inviting an owner takes an owner). A person who is
    already a member → 409. A new invitation to the same email replaces the pending one (its
    link stops working)."""
    service.require(m, "admin", "invite people")
    if role == "owner" and m.role != "owner":
        raise Forbidden("Only an owner may invite an owner")
    org = await service.lock_org(session, m.org_id)
    already = (
        await session.execute(
            select(OrganizationMember.user_id)
            .join(User, User.id == OrganizationMember.user_id)
            .where(OrganizationMember.org_id == org.id, User.email == email)
        )
    ).first()
    if already is not None:
        raise Conflict("This person is already a member of the organization")
    pending = (
        await session.execute(
            select(func.count()).select_from(OrganizationInvitation).where(*_pending(org.id, now))
        )
    ).scalar_one()
    if pending >= MAX_PENDING:
        raise Conflict(f"At most {MAX_PENDING} pending invitations; revoke some first")
    await session.execute(
        update(OrganizationInvitation)
        .where(*_pending(org.id, now), OrganizationInvitation.email == email)
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    raw = new_opaque_token()
    inv = OrganizationInvitation(
        id=uuid.uuid4(),
        org_id=org.id,
        email=email,
        role=role,
        token_hash=token_digest(raw),
        invited_by=m.user.id,
        created_at=now,
        expires_at=now + INVITATION_TTL,
    )
    session.add(inv)
    await session.flush()
    service.record_change(
        session,
        m.user,
        "invitation_create",
        org.id,
        {"invitation_id": str(inv.id), "email": email, "role": role},
    )
    link = settings.org_invite_url.replace("{token}", raw)
    message = OutgoingEmail(
        to=email,
        subject=f"You are invited to join {org.name} on Joyfull UI Hub",
        body=(
            "Hello,\n\n"
            f'{m.user.name} invited you to join the organization "{org.name}" on Joyfull UI Hub '
            f"as {role}.\n\n"
            f"Accept the invitation here (sign in or register with this email address first):\n{link}\n\n"
            "The link works once and expires in 7 days. If you did not expect this, ignore it.\n"
        ),
        kind="org_invitation",
        secrets=(raw, link),
    )
    return _out(inv), message


async def list_pending(
    session: AsyncSession, m: Membership, now: datetime, offset: int, limit: int
) -> tuple[list[InvitationOut], int]:
    service.require(m, "admin", "see invitations")
    total = (
        await session.execute(
            select(func.count()).select_from(OrganizationInvitation).where(*_pending(m.org_id, now))
        )
    ).scalar_one()
    rows = (
        await session.execute(
            select(OrganizationInvitation)
            .where(*_pending(m.org_id, now))
            .order_by(OrganizationInvitation.created_at.desc(), OrganizationInvitation.id.desc())
            .offset(offset)
            .limit(limit)
        )
    ).scalars()
    return [_out(inv) for inv in rows], int(total)


async def revoke(session: AsyncSession, m: Membership, invitation_id: uuid.UUID, now: datetime) -> None:
    """Revoke a pending invitation: its link stops working (404 when none is pending)."""
    service.require(m, "admin", "revoke invitations")
    found = (
        await session.execute(
            update(OrganizationInvitation)
            .where(OrganizationInvitation.id == invitation_id, *_pending(m.org_id, now))
            .values(revoked_at=now)
            .returning(OrganizationInvitation.email)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if found is None:
        raise NotFound("No such pending invitation")
    service.record_change(
        session,
        m.user,
        "invitation_revoke",
        m.org_id,
        {"invitation_id": str(invitation_id), "email": found[0]},
    )


async def revoke_all(session: AsyncSession, org_id: uuid.UUID, now: datetime) -> None:
    await session.execute(
        update(OrganizationInvitation)
        .where(*_pending(org_id, now))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )


async def accept(session: AsyncSession, user: User, token: str, now: datetime) -> OrganizationOut:
    """Join the organization of a pending invitation addressed to the caller's email."""
    inv = (
        await session.execute(
            select(OrganizationInvitation)
            .where(OrganizationInvitation.token_hash == token_digest(token))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if inv is None or inv.accepted_at is not None or inv.revoked_at is not None or inv.expires_at <= now:
        raise NotFound("This invitation is unknown, expired, revoked or already used")
    org = await session.get(Organization, inv.org_id)
    if org is None or org.deleted_at is not None:
        raise NotFound("This invitation is unknown, expired, revoked or already used")
    if inv.email != user.email:
        raise Forbidden("This invitation was sent to another email address")
    if not await service.add_member(session, org.id, user.id, inv.role, now):
        raise Conflict("You are already a member of this organization")
    inv.accepted_at = now
    await session.flush()
    service.record_change(
        session,
        user,
        "member_join",
        org.id,
        {"invitation_id": str(inv.id), "user_id": str(user.id), "role": inv.role},
    )
    return await service.view(session, org, inv.role, now)

"""Organizations, members and roles (API.md §13): the business rules; flushes, never commits.

Roles: owners do everything (billing, roles, deleting the organization); admins manage members
who are not owners, invitations, keys and member limits; members invoke and read. The caller's
membership is resolved once per request (`membership`, the route dependencies of `access.py`):
an organization the caller does not belong to — or a deleted one — is 404, an action the role
does not allow is 403.

"The last owner" is decided on the organization row held `FOR UPDATE`: every change that could
take away an owner (demotion, removal, leaving) locks it first, so two owners demoting each other
at once cannot leave the organization without one.

A member who leaves (or is removed) loses their organization keys at once on every instance:
the credential rule (`auth/credentials.py`) accepts an organization key only while its user is
a member, and the keys are also revoked in the same transaction for the record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Select, and_, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit
from joyhub.core.clock import utcnow
from joyhub.core.errors import Conflict, Forbidden, NotFound
from joyhub.core.pagination import Page
from joyhub.models import ApiKey, Organization, OrganizationMember, Subscription, User
from joyhub.orgs.schemas import AdminOrganizationOut, MemberOut, OrganizationOut
from joyhub.subscriptions import rollover
from joyhub.subscriptions import service as subscriptions
from joyhub.subscriptions.schemas import SubscriptionOut

MAX_OWNED_ORGS = 10
ROLE_RANK = {"member": 0, "admin": 1, "owner": 2}


@dataclass(frozen=True)
class Membership:
    """The caller's place in an organization, as this request found it."""

    org: Organization
    user: User
    role: str

    @property
    def org_id(self) -> uuid.UUID:
        return self.org.id

    def at_least(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


# --- the caller's membership ----------------------------------------------------------------


async def membership(session: AsyncSession, org_id: uuid.UUID, user: User) -> Membership:
    """The caller's membership of a live organization; 404 for anyone else."""
    row = (
        await session.execute(
            select(Organization, OrganizationMember.role)
            .join(OrganizationMember, OrganizationMember.org_id == Organization.id)
            .where(
                Organization.id == org_id,
                Organization.deleted_at.is_(None),
                OrganizationMember.user_id == user.id,
            )
        )
    ).first()
    if row is None:
        raise NotFound("Organization not found")
    return Membership(org=row[0], user=user, role=row[1])


def require(m: Membership, role: str, what: str) -> Membership:
    """403 unless the caller's role is at least `role`."""
    if not m.at_least(role):
        raise Forbidden(f"Only an organization {role} or above may {what}")
    return m


async def lock_org(session: AsyncSession, org_id: uuid.UUID) -> Organization:
    org = (
        await session.execute(
            select(Organization)
            .where(Organization.id == org_id, Organization.deleted_at.is_(None))
            .with_for_update(key_share=True)  # FOR NO KEY UPDATE: foreign-key checks pass by
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if org is None:
        raise NotFound("Organization not found")
    return org


def record_change(
    session: AsyncSession, actor: User | None, action: str, org_id: uuid.UUID, changes: dict[str, object]
) -> None:
    audit.record(
        session,
        actor=actor,
        action=f"organization.{action}",
        target_type="organization",
        target_id=org_id,
        changes=changes,
    )


# --- organizations --------------------------------------------------------------------------


async def view(session: AsyncSession, org: Organization, role: str, now: datetime) -> OrganizationOut:
    count = (
        await session.execute(
            select(func.count()).select_from(OrganizationMember).where(OrganizationMember.org_id == org.id)
        )
    ).scalar_one()
    return OrganizationOut(
        id=org.id,
        name=org.name,
        created_at=org.created_at,
        role=role,  # type: ignore[arg-type]  # a checked column
        member_count=int(count),
        subscription=await subscriptions.current(session, None, now, org_id=org.id),
    )


async def create(session: AsyncSession, user: User, name: str, now: datetime) -> OrganizationOut:
    """A new organization with the caller as its owner; at most MAX_OWNED_ORGS owned (409)."""
    # the user row serialises this user's creations, so the limit holds under parallel requests
    await session.execute(select(User.id).where(User.id == user.id).with_for_update())
    owned = (
        await session.execute(
            select(func.count())
            .select_from(OrganizationMember)
            .join(Organization, Organization.id == OrganizationMember.org_id)
            .where(
                OrganizationMember.user_id == user.id,
                OrganizationMember.role == "owner",
                Organization.deleted_at.is_(None),
            )
        )
    ).scalar_one()
    if owned >= MAX_OWNED_ORGS:
        raise Conflict(f"You own {MAX_OWNED_ORGS} organizations already; delete one first")
    org = Organization(id=uuid.uuid4(), name=name, created_by=user.id, created_at=now, updated_at=now)
    session.add(org)
    await session.flush()
    session.add(
        OrganizationMember(
            org_id=org.id, user_id=user.id, role="owner", joined_at=now, tokens_used=0, tokens_reserved=0
        )
    )
    await session.flush()
    record_change(session, user, "create", org.id, {"name": name})
    return await view(session, org, "owner", now)


async def list_mine(
    session: AsyncSession, user: User, page: Page, now: datetime
) -> tuple[list[OrganizationOut], int]:
    """The organizations the caller belongs to, newest membership first."""
    where = and_(OrganizationMember.user_id == user.id, Organization.deleted_at.is_(None))
    base = select(Organization, OrganizationMember.role).join(
        OrganizationMember, OrganizationMember.org_id == Organization.id
    )
    total = (
        await session.execute(
            select(func.count())
            .select_from(Organization)
            .join(OrganizationMember, OrganizationMember.org_id == Organization.id)
            .where(where)
        )
    ).scalar_one()
    rows = (
        await session.execute(
            base.where(where)
            .order_by(OrganizationMember.joined_at.desc(), Organization.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).all()
    return [await view(session, org, role, now) for org, role in rows], int(total)


async def rename(session: AsyncSession, m: Membership, name: str, now: datetime) -> OrganizationOut:
    org = await lock_org(session, m.org_id)
    if org.name != name:
        before = org.name
        org.name = name
        org.updated_at = now
        await session.flush()
        record_change(session, m.user, "update", org.id, {"name": [before, name]})
    return await view(session, org, m.role, now)


async def delete(session: AsyncSession, m: Membership, now: datetime) -> None:
    """Delete the organization: its subscription ends now, its keys stop, its pending invitations
    go; its usage history stays (for platform admins)."""
    org = await lock_org(session, m.org_id)
    org.deleted_at = now
    org.updated_at = now
    sub = (
        await session.execute(select(Subscription).where(Subscription.org_id == org.id).with_for_update())
    ).scalar_one_or_none()
    if sub is not None and sub.status == "active":
        sub.status = "cancelled"
        sub.cancel_at_period_end = False
        sub.scheduled_plan_code = None
        sub.current_period_end = max(min(sub.current_period_end, now), sub.current_period_start)
        sub.updated_at = now
    revoked = await _revoke_keys(session, ApiKey.org_id == org.id, now)
    from joyhub.orgs import invitations

    await invitations.revoke_all(session, org.id, now)
    await session.flush()
    record_change(session, m.user, "delete", org.id, {"name": org.name, "api_keys_revoked": revoked})


async def _revoke_keys(session: AsyncSession, where: ColumnElement[bool], now: datetime) -> int:
    result = await session.execute(
        update(ApiKey)
        .where(where, ApiKey.is_active.is_(True))
        .values(is_active=False, revoked_at=func.coalesce(ApiKey.revoked_at, now))
        .returning(ApiKey.id)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())


# --- members --------------------------------------------------------------------------------


# a member's `tokens_used` for the organization subscription's current period
_EFFECTIVE_USED = case(
    (OrganizationMember.period_end == Subscription.current_period_end, OrganizationMember.tokens_used),
    else_=0,
)


def _member_query(org_id: uuid.UUID) -> Select[OrganizationMember, str, str, int]:
    return (
        select(OrganizationMember, User.email, User.name, _EFFECTIVE_USED)
        .join(User, User.id == OrganizationMember.user_id)
        .outerjoin(Subscription, Subscription.org_id == OrganizationMember.org_id)
        .where(OrganizationMember.org_id == org_id)
    )


def _member_out(member: OrganizationMember, email: str, name: str, used: int) -> MemberOut:
    return MemberOut(
        user_id=member.user_id,
        email=email,
        name=name,
        role=member.role,  # type: ignore[arg-type]  # a checked column
        token_limit=member.token_limit,
        tokens_used=int(used or 0),
        joined_at=member.joined_at,
    )


async def list_members(session: AsyncSession, m: Membership, page: Page) -> tuple[list[MemberOut], int]:
    """Owners first, then admins, then members; each group by when they joined. The
    organization's subscription is rolled forward first, so `tokens_used` is this period's."""
    await rollover.ensure_current(session, None, utcnow(), org_id=m.org_id)
    total = (
        await session.execute(
            select(func.count()).select_from(OrganizationMember).where(OrganizationMember.org_id == m.org_id)
        )
    ).scalar_one()
    order = case({"owner": 0, "admin": 1}, value=OrganizationMember.role, else_=2)
    rows = (
        await session.execute(
            _member_query(m.org_id)
            .order_by(order, OrganizationMember.joined_at, OrganizationMember.user_id)
            .offset(page.offset)
            .limit(page.limit)
        )
    ).all()
    return [_member_out(m, email, name, used) for m, email, name, used in rows], int(total)


async def get_member(session: AsyncSession, org_id: uuid.UUID, user_id: uuid.UUID) -> MemberOut:
    row = (await session.execute(_member_query(org_id).where(OrganizationMember.user_id == user_id))).first()
    if row is None:
        raise NotFound("No such member")
    member, email, name, used = row
    return _member_out(member, email, name, used)


async def _locked_member(session: AsyncSession, org_id: uuid.UUID, user_id: uuid.UUID) -> OrganizationMember:
    member = (
        await session.execute(
            select(OrganizationMember)
            .where(OrganizationMember.org_id == org_id, OrganizationMember.user_id == user_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if member is None:
        raise NotFound("No such member")
    return member


async def _owner_count(session: AsyncSession, org_id: uuid.UUID) -> int:
    return int(
        (
            await session.execute(
                select(func.count())
                .select_from(OrganizationMember)
                .where(OrganizationMember.org_id == org_id, OrganizationMember.role == "owner")
            )
        ).scalar_one()
    )


_UNSET = object()


async def update_member(
    session: AsyncSession,
    m: Membership,
    user_id: uuid.UUID,
    *,
    role: str | None,
    token_limit: int | object | None = _UNSET,
    now: datetime,
) -> MemberOut:
    """Change a member's role or limit. Admins set limits and move people between `member` and
    `admin`; only owners grant or take `owner`, or change an owner's limit; the last owner
    cannot be demoted (409)."""
    await lock_org(session, m.org_id)  # serialises every change that could remove an owner
    member = await _locked_member(session, m.org_id, user_id)
    touches_owner = member.role == "owner" or role == "owner"
    if touches_owner and m.role != "owner":
        raise Forbidden("Only an owner may grant, take or change the owner role")
    changes: dict[str, object] = {"user_id": str(user_id)}
    if role is not None and role != member.role:
        if member.role == "owner" and await _owner_count(session, m.org_id) <= 1:
            raise Conflict("The last owner cannot be demoted; make someone else an owner first")
        changes["role"] = [member.role, role]
        member.role = role
    if token_limit is not _UNSET and token_limit != member.token_limit:
        changes["token_limit"] = [member.token_limit, token_limit]
        member.token_limit = token_limit if isinstance(token_limit, int) else None
    if len(changes) > 1:
        await session.flush()
        record_change(session, m.user, "member_update", m.org_id, changes)
    return await get_member(session, m.org_id, user_id)


async def remove_member(session: AsyncSession, m: Membership, user_id: uuid.UUID, now: datetime) -> None:
    """Remove a member (admin+), or leave (the member themself). Admins cannot remove owners;
    the last owner can neither leave nor be removed (409). The member's organization keys stop
    at once (the credential rule checks membership) and are revoked in this transaction."""
    leaving = user_id == m.user.id
    if not leaving:
        require(m, "admin", "remove members")
    await lock_org(session, m.org_id)
    member = await _locked_member(session, m.org_id, user_id)
    if member.role == "owner":
        if not leaving and m.role != "owner":
            raise Forbidden("Only an owner may remove an owner")
        if await _owner_count(session, m.org_id) <= 1:
            raise Conflict(
                "The last owner cannot leave; make someone else an owner or delete the organization"
            )
    await session.delete(member)
    revoked = await _revoke_keys(session, and_(ApiKey.org_id == m.org_id, ApiKey.user_id == user_id), now)
    await session.flush()
    record_change(
        session,
        m.user,
        "member_leave" if leaving else "member_remove",
        m.org_id,
        {"user_id": str(user_id), "role": member.role, "api_keys_revoked": revoked},
    )


async def add_member(
    session: AsyncSession, org_id: uuid.UUID, user_id: uuid.UUID, role: str, now: datetime
) -> bool:
    """Add a member (an accepted invitation); False when they already are one."""
    existing = await session.get(OrganizationMember, (org_id, user_id))
    if existing is not None:
        return False
    session.add(
        OrganizationMember(
            org_id=org_id, user_id=user_id, role=role, joined_at=now, tokens_used=0, tokens_reserved=0
        )
    )
    await session.flush()
    return True


# --- organization API keys ------------------------------------------------------------------


async def list_keys(session: AsyncSession, m: Membership, page: Page) -> tuple[list[ApiKey], int]:
    """Every key of the organization, whoever made it, newest first (admin+)."""
    require(m, "admin", "manage the organization's API keys")
    total = (
        await session.execute(select(func.count()).select_from(ApiKey).where(ApiKey.org_id == m.org_id))
    ).scalar_one()
    rows = (
        await session.execute(
            select(ApiKey)
            .where(ApiKey.org_id == m.org_id)
            .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).scalars()
    return list(rows), int(total)


async def revoke_key(session: AsyncSession, m: Membership, key_id: uuid.UUID, now: datetime) -> None:
    require(m, "admin", "manage the organization's API keys")
    if not await _revoke_keys(session, and_(ApiKey.id == key_id, ApiKey.org_id == m.org_id), now):
        exists = await session.execute(
            select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.org_id == m.org_id)
        )
        if exists.first() is None:
            raise NotFound("No such API key")
        return  # already revoked: harmless
    record_change(session, m.user, "api_key_revoke", m.org_id, {"api_key_id": str(key_id)})


# --- the platform admin's views -------------------------------------------------------------


async def admin_view(session: AsyncSession, org: Organization, now: datetime) -> AdminOrganizationOut:
    count = (
        await session.execute(
            select(func.count()).select_from(OrganizationMember).where(OrganizationMember.org_id == org.id)
        )
    ).scalar_one()
    owners = (
        await session.execute(
            select(User.email)
            .join(OrganizationMember, OrganizationMember.user_id == User.id)
            .where(OrganizationMember.org_id == org.id, OrganizationMember.role == "owner")
            .order_by(User.email)
        )
    ).scalars()
    return AdminOrganizationOut(
        id=org.id,
        name=org.name,
        created_at=org.created_at,
        deleted_at=org.deleted_at,
        member_count=int(count),
        owners=list(owners),
        subscription=await subscriptions.current(session, None, now, org_id=org.id),
    )


async def admin_list(
    session: AsyncSession, search: str | None, page: Page, now: datetime
) -> tuple[list[AdminOrganizationOut], int]:
    """Every organization, deleted ones included (their history stays), newest first."""
    conds = [Organization.name.ilike(f"%{search}%")] if search else []
    total = (await session.execute(select(func.count()).select_from(Organization).where(*conds))).scalar_one()
    rows = (
        await session.execute(
            select(Organization)
            .where(*conds)
            .order_by(Organization.created_at.desc(), Organization.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).scalars()
    return [await admin_view(session, org, now) for org in rows], int(total)


async def admin_get(session: AsyncSession, org_id: uuid.UUID, now: datetime) -> AdminOrganizationOut:
    org = await session.get(Organization, org_id)
    if org is None:
        raise NotFound("Organization not found")
    return await admin_view(session, org, now)


async def admin_grant(
    session: AsyncSession,
    admin: User,
    org_id: uuid.UUID,
    plan: str,
    expires_at: datetime | None,
    now: datetime,
) -> SubscriptionOut:
    """Put a live organization on a plan now (a new period), as `PUT /admin/users/{id}/subscription`."""
    await lock_org(session, org_id)
    return await subscriptions.grant(
        session, admin=admin, user_id=None, org_id=org_id, plan_code=plan, expires_at=expires_at, now=now
    )

"""HTTP routes of the teams domain (API.md §13): thin — parse, call the service, wrap the envelope.

Each route's least role is in its signature (`OrgMember`, `OrgAdmin`, `OrgOwner`, `orgs/access.py`)
and in its OpenAPI description. An organization the caller does not belong to is 404; a role
that may not is 403.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from joyhub.auth.dependencies import CurrentUser
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings
from joyhub.core.db import DbSession
from joyhub.core.email import send_in_background
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.leases import leases_for
from joyhub.core.pagination import PageParams
from joyhub.orgs import invitations, service
from joyhub.orgs import usage as org_usage
from joyhub.orgs.access import OrgAdmin, OrgKeyManager, OrgMember, OrgOwner
from joyhub.orgs.schemas import (
    AcceptIn,
    InvitationIn,
    InvitationOut,
    MemberOut,
    MemberUpdateIn,
    OrganizationOut,
    OrgCreateIn,
    OrgUpdateIn,
    OrgUsageSummary,
)
from joyhub.orgs.service import Membership
from joyhub.subscriptions import service as subscriptions
from joyhub.subscriptions.schemas import SubscribeIn, SubscriptionOut
from joyhub.usage import service as usage_service
from joyhub.usage.dates import RangeParams
from joyhub.usage.router import StatusParam, ToolIdParam, csv_export
from joyhub.usage.schemas import Granularity, TimeseriesPoint, UsageRecord
from joyhub.users import service as users
from joyhub.users.schemas import ApiKeyCreatedOut, ApiKeyCreateIn, ApiKeyOut

router = APIRouter()
invitations_router = APIRouter()


def _doc(code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Envelope[None], "description": description}}


_MEMBER: dict[int | str, dict[str, Any]] = {
    **_doc(401, "Not authenticated"),
    **_doc(404, "No such organization, or the caller is not a member"),
}
_ROLE: dict[int | str, dict[str, Any]] = {**_MEMBER, **_doc(403, "The caller's role may not do this")}
_BODY = _doc(422, "Validation error")

ROLE_MEMBER = "Role: any member."
ROLE_ADMIN = "Role: admin or owner (403 for a member)."
ROLE_OWNER = "Role: owner (403 for an admin or member)."


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# --- organizations --------------------------------------------------------------------------


@router.post(
    "",
    status_code=201,
    response_model=Envelope[OrganizationOut],
    summary="Create an organization; the caller becomes its owner",
    description="Role: any user. At most 10 organizations owned per user (409 CONFLICT).",
    responses={**_doc(401, "Not authenticated"), **_doc(409, "Already owns 10 organizations"), **_BODY},
)
async def create_org(body: OrgCreateIn, principal: CurrentUser, db: DbSession) -> Envelope[OrganizationOut]:
    return ok(await service.create(db, principal.user, body.name, utcnow()))


@router.get(
    "",
    response_model=Envelope[list[OrganizationOut]],
    summary="The organizations the caller belongs to",
    description="Role: any user; lists only their own organizations, with their role in each.",
    responses={**_doc(401, "Not authenticated"), **_BODY},
)
async def list_orgs(
    principal: CurrentUser, db: DbSession, paging: PageParams
) -> Envelope[list[OrganizationOut]]:
    items, total = await service.list_mine(db, principal.user, paging, utcnow())
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.get(
    "/{org_id}",
    response_model=Envelope[OrganizationOut],
    summary="One organization",
    description=ROLE_MEMBER,
    responses=_MEMBER,
)
async def get_org(m: OrgMember, db: DbSession) -> Envelope[OrganizationOut]:
    return ok(await service.view(db, m.org, m.role, utcnow()))


@router.patch(
    "/{org_id}",
    response_model=Envelope[OrganizationOut],
    summary="Rename an organization",
    description=ROLE_ADMIN,
    responses={**_ROLE, **_BODY},
)
async def update_org(body: OrgUpdateIn, m: OrgAdmin, db: DbSession) -> Envelope[OrganizationOut]:
    return ok(await service.rename(db, m, body.name, utcnow()))


@router.delete(
    "/{org_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an organization: its subscription ends now and its keys stop",
    description=ROLE_OWNER + " Its usage history stays, for platform admins.",
    responses=_ROLE,
)
async def delete_org(m: OrgOwner, db: DbSession) -> Response:
    await service.delete(db, m, utcnow())
    return Response(status_code=204)


# --- members --------------------------------------------------------------------------------


@router.get(
    "/{org_id}/members",
    response_model=Envelope[list[MemberOut]],
    summary="The organization's members, owners first",
    description=ROLE_MEMBER,
    responses={**_MEMBER, **_BODY},
)
async def list_members(m: OrgMember, db: DbSession, paging: PageParams) -> Envelope[list[MemberOut]]:
    items, total = await service.list_members(db, m, paging)
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.patch(
    "/{org_id}/members/{user_id}",
    response_model=Envelope[MemberOut],
    summary="Change a member's role or token limit",
    description=ROLE_ADMIN
    + " Admins set limits and move people between member and admin; only owners grant, take or"
    " change the owner role. The last owner cannot be demoted (409 CONFLICT).",
    responses={**_ROLE, **_doc(409, "The last owner"), **_BODY},
)
async def update_member(
    user_id: uuid.UUID, body: MemberUpdateIn, m: OrgAdmin, db: DbSession
) -> Envelope[MemberOut]:
    kwargs: dict[str, Any] = {}
    if "token_limit" in body.model_fields_set:
        kwargs["token_limit"] = body.token_limit
    return ok(await service.update_member(db, m, user_id, role=body.role, now=utcnow(), **kwargs))


@router.delete(
    "/{org_id}/members/{user_id}",
    status_code=204,
    response_class=Response,
    summary="Remove a member, or leave",
    description="Role: admin or owner, or the member themself (leaving). Admins cannot remove owners;"
    " the last owner can neither leave nor be removed (409 CONFLICT). The member's organization"
    " keys stop at once.",
    responses={**_ROLE, **_doc(409, "The last owner")},
)
async def remove_member(user_id: uuid.UUID, m: OrgMember, db: DbSession) -> Response:
    await service.remove_member(db, m, user_id, utcnow())
    return Response(status_code=204)


# --- invitations ----------------------------------------------------------------------------


@router.post(
    "/{org_id}/invitations",
    status_code=201,
    response_model=Envelope[InvitationOut],
    summary="Invite someone by email (single-use link, valid 7 days)",
    description=ROLE_ADMIN + " Inviting an owner takes an owner. Someone already a member → 409.",
    responses={**_ROLE, **_doc(409, "Already a member"), **_BODY},
)
async def create_invitation(
    body: InvitationIn, m: OrgAdmin, db: DbSession, request: Request, background: BackgroundTasks
) -> Envelope[InvitationOut]:
    settings = _settings(request)
    out, message = await invitations.create(db, m, body.email, body.role, settings, utcnow())
    send_in_background(background, settings, message)
    return ok(out)


@router.get(
    "/{org_id}/invitations",
    response_model=Envelope[list[InvitationOut]],
    summary="Pending invitations",
    description=ROLE_ADMIN,
    responses={**_ROLE, **_BODY},
)
async def list_invitations(m: OrgAdmin, db: DbSession, paging: PageParams) -> Envelope[list[InvitationOut]]:
    items, total = await invitations.list_pending(db, m, utcnow(), paging.offset, paging.limit)
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.delete(
    "/{org_id}/invitations/{invitation_id}",
    status_code=204,
    response_class=Response,
    summary="Revoke a pending invitation",
    description=ROLE_ADMIN,
    responses=_ROLE,
)
async def revoke_invitation(invitation_id: uuid.UUID, m: OrgAdmin, db: DbSession) -> Response:
    await invitations.revoke(db, m, invitation_id, utcnow())
    return Response(status_code=204)


@invitations_router.post(
    "/accept",
    response_model=Envelope[OrganizationOut],
    summary="Accept an invitation and join its organization",
    description="Role: any user whose email is the invited one (403 otherwise). An unknown, expired,"
    " revoked or used token → 404; already a member → 409.",
    responses={
        **_doc(401, "Not authenticated"),
        **_doc(403, "The invitation was sent to another email"),
        **_doc(404, "Unknown, expired, revoked or used"),
        **_doc(409, "Already a member"),
        **_BODY,
    },
)
async def accept_invitation(
    body: AcceptIn, principal: CurrentUser, db: DbSession
) -> Envelope[OrganizationOut]:
    return ok(await invitations.accept(db, principal.user, body.token, utcnow()))


# --- subscription ---------------------------------------------------------------------------


@router.get(
    "/{org_id}/subscription",
    response_model=Envelope[SubscriptionOut | None],
    summary="The organization's subscription (data: null when it never subscribed)",
    description=ROLE_MEMBER,
    responses=_MEMBER,
)
async def get_subscription(m: OrgMember, db: DbSession) -> Envelope[SubscriptionOut | None]:
    return ok(await subscriptions.current(db, None, utcnow(), org_id=m.org_id))


@router.post(
    "/{org_id}/subscription",
    response_model=Envelope[SubscriptionOut],
    summary="Subscribe the organization, or change its plan (API.md §4 lifecycle)",
    description=ROLE_OWNER,
    responses={
        201: {"model": Envelope[SubscriptionOut], "description": "A new subscription period started"},
        **_ROLE,
        **_doc(422, "Unknown or inactive plan"),
    },
)
async def subscribe(
    body: SubscribeIn, m: OrgOwner, db: DbSession, response: Response
) -> Envelope[SubscriptionOut]:
    result = await subscriptions.change_plan(
        db, actor=m.user, user_id=None, org_id=m.org_id, plan_code=body.plan, now=utcnow()
    )
    if result.started_new_period:
        response.status_code = status.HTTP_201_CREATED
    return ok(result.subscription)


@router.post(
    "/{org_id}/subscription/cancel",
    response_model=Envelope[SubscriptionOut],
    summary="Cancel the organization's subscription at the period end",
    description=ROLE_OWNER,
    responses={**_ROLE, **_doc(409, "Already ended")},
)
async def cancel_subscription(m: OrgOwner, db: DbSession) -> Envelope[SubscriptionOut]:
    return ok(await subscriptions.cancel(db, actor=m.user, user_id=None, org_id=m.org_id, now=utcnow()))


@router.post(
    "/{org_id}/subscription/resume",
    response_model=Envelope[SubscriptionOut],
    summary="Undo a pending cancellation of the organization's subscription",
    description=ROLE_OWNER,
    responses={**_ROLE, **_doc(409, "Already ended")},
)
async def resume_subscription(m: OrgOwner, db: DbSession) -> Envelope[SubscriptionOut]:
    return ok(await subscriptions.resume(db, actor=m.user, user_id=None, org_id=m.org_id, now=utcnow()))


# --- organization API keys ------------------------------------------------------------------


@router.get(
    "/{org_id}/api-keys",
    response_model=Envelope[list[ApiKeyOut]],
    summary="The organization's API keys (they bill the organization)",
    description=ROLE_ADMIN + " With an access token (an API key → 403).",
    responses={**_ROLE, **_BODY},
)
async def list_api_keys(m: OrgKeyManager, db: DbSession, paging: PageParams) -> Envelope[list[ApiKeyOut]]:
    keys, total = await service.list_keys(db, m, paging)
    now = utcnow()
    return page(
        [users.api_key_out(k, now) for k in keys], offset=paging.offset, limit=paging.limit, total=total
    )


@router.post(
    "/{org_id}/api-keys",
    status_code=201,
    response_model=Envelope[ApiKeyCreatedOut],
    summary="Create an organization API key; the full key is in this response only",
    description=ROLE_ADMIN
    + " With an access token. The key bills the organization; the member who made it is the caller,"
    " and it stops when they leave.",
    responses={**_ROLE, **_doc(409, "At most 20 active keys"), **_BODY},
)
async def create_api_key(body: ApiKeyCreateIn, m: OrgKeyManager, db: DbSession) -> Envelope[ApiKeyCreatedOut]:
    now = utcnow()
    await service.lock_org(db, m.org_id)  # serialises the organization's key count
    key, raw = await users.create_api_key(
        db,
        m.user,
        name=body.name,
        expires_at=body.expires_at,
        now=now,
        requests_per_minute=body.requests_per_minute,
        org_id=m.org_id,
    )
    return ok(ApiKeyCreatedOut(**users.api_key_out(key, now).model_dump(), key=raw))


@router.delete(
    "/{org_id}/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    summary="Revoke an organization API key; it stops working at once",
    description=ROLE_ADMIN + " With an access token.",
    responses=_ROLE,
)
async def revoke_api_key(key_id: uuid.UUID, m: OrgKeyManager, db: DbSession) -> Response:
    await service.revoke_key(db, m, key_id, utcnow())
    return Response(status_code=204)


# --- usage ----------------------------------------------------------------------------------

MemberParam = Annotated[
    uuid.UUID | None, Query(description="Only this member's calls (admins and owners; members see their own)")
]


def _scope(m: Membership, user_id: uuid.UUID | None) -> org_usage.Scope:
    """Admins and owners see every member's calls (or one member's); a member their own."""
    if m.at_least("admin"):
        return org_usage.Scope(m.org_id, user_id)
    return org_usage.Scope(m.org_id, m.user.id)


_USAGE_DOC = " Admins and owners see every member's calls and may filter by user_id; a member sees their own."


@router.get(
    "/{org_id}/usage",
    response_model=Envelope[list[UsageRecord]],
    summary="The organization's usage history, newest first",
    description=ROLE_MEMBER + _USAGE_DOC,
    responses={**_MEMBER, **_BODY},
)
async def list_usage(
    m: OrgMember,
    db: DbSession,
    dates: RangeParams,
    paging: PageParams,
    tool_id: ToolIdParam = None,
    status: StatusParam = None,
    user_id: MemberParam = None,
) -> Envelope[list[UsageRecord]]:
    start, end = dates
    items, total = await org_usage.history(
        db, _scope(m, user_id), start, end, usage_service.LogFilter(tool_id, status), paging
    )
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.get(
    "/{org_id}/usage/summary",
    response_model=Envelope[OrgUsageSummary],
    summary="The organization's totals, per tool and per member",
    description=ROLE_MEMBER + _USAGE_DOC + " `by_member` is shown to admins and owners.",
    responses={**_MEMBER, **_BODY},
)
async def usage_summary(
    m: OrgMember, db: DbSession, dates: RangeParams, user_id: MemberParam = None
) -> Envelope[OrgUsageSummary]:
    start, end = dates
    return ok(
        await org_usage.summary(db, _scope(m, user_id), start, end, utcnow(), by_member=m.at_least("admin"))
    )


@router.get(
    "/{org_id}/usage/timeseries",
    response_model=Envelope[list[TimeseriesPoint]],
    summary="The organization's invocations and tokens per hour or day",
    description=ROLE_MEMBER + _USAGE_DOC,
    responses={**_MEMBER, **_BODY},
)
async def usage_timeseries(
    m: OrgMember,
    db: DbSession,
    dates: RangeParams,
    granularity: Annotated[Granularity, Query(description="Bucket size")] = "day",
    user_id: MemberParam = None,
) -> Envelope[list[TimeseriesPoint]]:
    start, end = dates
    return ok(await org_usage.timeseries(db, _scope(m, user_id), start, end, granularity, utcnow()))


@router.get(
    "/{org_id}/usage/export",
    response_class=StreamingResponse,
    summary="The organization's usage records as a CSV download",
    description=ROLE_MEMBER + _USAGE_DOC + " The columns of GET /usage/export.",
    responses={200: {"content": {"text/csv": {}}, "description": "CSV attachment"}, **_MEMBER, **_BODY},
)
async def usage_export(
    request: Request,
    m: OrgMember,
    dates: RangeParams,
    tool_id: ToolIdParam = None,
    status: StatusParam = None,
    user_id: MemberParam = None,
) -> StreamingResponse:
    start, end = dates
    rng = usage_service.export_range(start, end)
    now = utcnow()
    leases = leases_for(request.app.state)
    lease = await usage_service.start_export(leases, m.user.id, now)
    body = org_usage.export(
        request.app.state.sessionmaker, _scope(m, user_id), rng, usage_service.LogFilter(tool_id, status)
    )
    filename = f"org-{usage_service.export_filename(rng, now)}"
    return csv_export(body, leases=leases, lease=lease, filename=filename)

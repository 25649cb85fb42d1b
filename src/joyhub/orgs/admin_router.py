"""The platform admin's views of organizations and their grants (API.md §13, as §7): role
`admin` only (anyone else 403, anonymous 401)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from joyhub.auth.dependencies import AdminUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.pagination import PageParams
from joyhub.orgs import service
from joyhub.orgs.schemas import AdminOrganizationOut
from joyhub.subscriptions.schemas import GrantIn, SubscriptionOut

router = APIRouter()

_ADMIN: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not a platform admin"},
    422: {"model": Envelope[None], "description": "Validation error"},
}
_ROLE = "Role: platform admin."


@router.get(
    "",
    response_model=Envelope[list[AdminOrganizationOut]],
    summary="Every organization (deleted ones included), newest first",
    description=_ROLE,
    responses=_ADMIN,
)
async def list_orgs(
    admin: AdminUser,
    db: DbSession,
    paging: PageParams,
    search: Annotated[str | None, Query(max_length=100, description="Part of the name")] = None,
) -> Envelope[list[AdminOrganizationOut]]:
    items, total = await service.admin_list(db, search, paging, utcnow())
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.get(
    "/{org_id}",
    response_model=Envelope[AdminOrganizationOut],
    summary="One organization",
    description=_ROLE,
    responses={**_ADMIN, 404: {"model": Envelope[None], "description": "No such organization"}},
)
async def get_org(org_id: uuid.UUID, admin: AdminUser, db: DbSession) -> Envelope[AdminOrganizationOut]:
    return ok(await service.admin_get(db, org_id, utcnow()))


@router.put(
    "/{org_id}/subscription",
    response_model=Envelope[SubscriptionOut],
    summary="Grant or change an organization's plan now (a new period)",
    description=_ROLE,
    responses={**_ADMIN, 404: {"model": Envelope[None], "description": "No such (live) organization"}},
)
async def grant_org_subscription(
    org_id: uuid.UUID, body: GrantIn, admin: AdminUser, db: DbSession
) -> Envelope[SubscriptionOut]:
    return ok(await service.admin_grant(db, admin.user, org_id, body.plan, body.expires_at, utcnow()))

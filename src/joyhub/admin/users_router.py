"""Admin routes: users (API.md §7). Every route requires the admin role (`AdminUser`)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AfterValidator

from joyhub.admin import service
from joyhub.admin.schemas import AdminUserOut, AdminUserUpdate, Role
from joyhub.auth.dependencies import AdminUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.pagination import PageParams
from joyhub.users.schemas import reject_nul

router = APIRouter()

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not an admin"},
    422: {"model": Envelope[None], "description": "Invalid query, path or body"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Envelope[None], "description": "No such user"}}

SearchParam = Annotated[
    str | None,
    Query(max_length=100, description="Case-insensitive substring of the name or email, or a user id"),
    AfterValidator(lambda v: reject_nul(v).strip() if v is not None else None),
]


@router.get(
    "",
    response_model=Envelope[list[AdminUserOut]],
    summary="List users (newest first) with their subscription, last login and API key count",
    responses=_AUTH_ERRORS,
)
async def list_users(
    session: DbSession,
    admin: AdminUser,
    paging: PageParams,
    search: SearchParam = None,
    role: Annotated[Role | None, Query(description="Only this role")] = None,
    is_active: Annotated[bool | None, Query(description="Only active (true) or disabled (false)")] = None,
) -> Envelope[list[AdminUserOut]]:
    items, total = await service.list_users(
        session, service.UserFilter(search or None, role, is_active), paging, utcnow()
    )
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.get(
    "/{user_id}",
    response_model=Envelope[AdminUserOut],
    summary="One user, as in the list",
    responses={**_AUTH_ERRORS, **_NOT_FOUND},
)
async def get_user(session: DbSession, admin: AdminUser, user_id: uuid.UUID) -> Envelope[AdminUserOut]:
    return ok(await service.get_user(session, user_id, utcnow()))


@router.patch(
    "/{user_id}",
    response_model=Envelope[AdminUserOut],
    summary="Rename, change the role, or enable/disable a user",
    description=(
        "The last active admin can neither be demoted nor disabled (409 CONFLICT). Disabling "
        "revokes every session of the user at once, and their API keys stop working. Audited as "
        "`user.update`."
    ),
    responses={
        **_AUTH_ERRORS,
        **_NOT_FOUND,
        409: {"model": Envelope[None], "description": "Would leave no active admin"},
    },
)
async def update_user(
    session: DbSession, admin: AdminUser, user_id: uuid.UUID, body: AdminUserUpdate
) -> Envelope[AdminUserOut]:
    return ok(await service.update_user(session, admin.user, user_id, body, utcnow()))

"""Admin routes: the audit log (API.md §7, `GET /admin/audit-logs`)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import AfterValidator

from joyhub.admin import service
from joyhub.admin.schemas import AuditEntry, TargetType
from joyhub.auth.dependencies import AdminUser
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, page
from joyhub.core.pagination import PageParams
from joyhub.users.schemas import reject_nul

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not an admin"},
    422: {"model": Envelope[None], "description": "Invalid filter"},
}


@router.get(
    "",
    response_model=Envelope[list[AuditEntry]],
    summary="Audit entries, newest first",
    responses=_ERRORS,
)
async def list_audit_logs(
    session: DbSession,
    admin: AdminUser,
    paging: PageParams,
    actor_id: Annotated[uuid.UUID | None, Query(description="Only entries by this user")] = None,
    action: Annotated[
        str | None,
        Query(max_length=64, description="Exact action, e.g. `user.update`"),
        AfterValidator(lambda v: reject_nul(v) if v is not None else None),
    ] = None,
    target_type: Annotated[TargetType | None, Query(description="Only this kind of target")] = None,
    target_id: Annotated[
        str | None,
        Query(max_length=64, description="Only entries about this target (its id or code)"),
        AfterValidator(lambda v: reject_nul(v) if v is not None else None),
    ] = None,
) -> Envelope[list[AuditEntry]]:
    items, total = await service.list_audit(
        session, service.AuditFilter(actor_id, action, target_type, target_id), paging
    )
    return page(items, offset=paging.offset, limit=paging.limit, total=total)

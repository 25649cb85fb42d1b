"""Admin routes: tools (API.md §7). Admin only; every write is audited with the secret masked."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from joyhub.auth.dependencies import AdminUser
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.pagination import PageParams
from joyhub.tools import service
from joyhub.tools.breaker import Breakers
from joyhub.tools.schemas import AdminToolOut, ToolCreate, ToolUpdate

router = APIRouter()

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not an administrator"},
    422: {"model": Envelope[None], "description": "Validation failed"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Envelope[None], "description": "No such tool (or deleted)"}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Envelope[None], "description": "A live tool already has this name"}
}


def _breakers(request: Request) -> Breakers:
    breakers: Breakers = request.app.state.gateway.breakers
    return breakers


@router.get(
    "",
    response_model=Envelope[list[AdminToolOut]],
    summary="All live tools, inactive ones included",
    responses=_AUTH,
)
async def list_tools(
    request: Request,
    session: DbSession,
    admin: AdminUser,
    paging: PageParams,
    search: Annotated[str | None, Query(max_length=100)] = None,
    is_active: bool | None = None,
) -> Envelope[list[AdminToolOut]]:
    tools, total = await service.list_admin(
        session, search=service.clean_filter("query.search", search), is_active=is_active, page=paging
    )
    views = await _breakers(request).views(str(t.id) for t in tools)
    items = [service.admin_tool_out(t, views[str(t.id)]) for t in tools]
    return page(items, offset=paging.offset, limit=paging.limit, total=total)


@router.post(
    "",
    response_model=Envelope[AdminToolOut],
    status_code=201,
    summary="Add a tool to the catalog",
    responses={**_AUTH, **_CONFLICT},
)
async def create_tool(
    body: ToolCreate, request: Request, session: DbSession, admin: AdminUser
) -> Envelope[AdminToolOut]:
    tool = await service.create_tool(
        session, admin.user, body, request.app.state.settings, request.app.state.egress
    )
    view = await _breakers(request).view(str(tool.id))
    return ok(service.admin_tool_out(tool, view))


@router.get(
    "/{tool_id}",
    response_model=Envelope[AdminToolOut],
    summary="One tool, with its circuit state",
    responses={**_AUTH, **_NOT_FOUND},
)
async def get_tool(
    tool_id: uuid.UUID, request: Request, session: DbSession, admin: AdminUser
) -> Envelope[AdminToolOut]:
    tool = await service.get_admin_tool(session, tool_id)
    return ok(service.admin_tool_out(tool, await _breakers(request).view(str(tool.id))))


@router.patch(
    "/{tool_id}",
    response_model=Envelope[AdminToolOut],
    summary="Change a tool (effective for the very next invocation on every worker)",
    description="Any ToolCreate field; `null` clears an optional one (category, input_schema, "
    "min_plan, auth_header_name, auth_header_value). Clearing auth_header_name clears the secret.",
    responses={**_AUTH, **_NOT_FOUND, **_CONFLICT},
)
async def update_tool(
    tool_id: uuid.UUID, body: ToolUpdate, request: Request, session: DbSession, admin: AdminUser
) -> Envelope[AdminToolOut]:
    tool = await service.update_tool(
        session, admin.user, tool_id, body, request.app.state.settings, request.app.state.egress
    )
    return ok(service.admin_tool_out(tool, await _breakers(request).view(str(tool.id))))


@router.delete(
    "/{tool_id}",
    status_code=204,
    response_class=Response,
    summary="Remove a tool from the catalog (its usage history is kept)",
    responses={**_AUTH, **_NOT_FOUND},
)
async def delete_tool(tool_id: uuid.UUID, session: DbSession, admin: AdminUser) -> Response:
    await service.delete_tool(session, admin.user, tool_id)
    return Response(status_code=204)


@router.post(
    "/{tool_id}/circuit/reset",
    response_model=Envelope[AdminToolOut],
    summary="Close the tool's circuit breaker now",
    responses={**_AUTH, **_NOT_FOUND},
)
async def reset_circuit(
    tool_id: uuid.UUID, request: Request, session: DbSession, admin: AdminUser
) -> Envelope[AdminToolOut]:
    tool, view = await service.reset_circuit(session, admin.user, tool_id, _breakers(request))
    return ok(service.admin_tool_out(tool, view))

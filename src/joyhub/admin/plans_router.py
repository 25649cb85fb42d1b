"""Admin routes: plans (API.md §7). Plans are data; editing one reaches its subscribers at once."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from joyhub.auth.dependencies import AdminUser
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok
from joyhub.subscriptions import service
from joyhub.subscriptions.schemas import PLAN_CODE_MAX, AdminPlanOut, PlanUpdate

router = APIRouter()

_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
    403: {"model": Envelope[None], "description": "Not an administrator"},
}

PlanCodePath = Annotated[
    str, Path(min_length=1, max_length=PLAN_CODE_MAX, pattern=r"^[A-Za-z0-9_.-]+$", description="Plan code")
]


@router.get(
    "",
    response_model=Envelope[list[AdminPlanOut]],
    summary="Every plan by rank, inactive ones included",
    responses=_ADMIN_ERRORS,
)
async def list_plans(session: DbSession, admin: AdminUser) -> Envelope[list[AdminPlanOut]]:
    return ok([AdminPlanOut.of(p) for p in await service.list_plans(session, include_inactive=True)])


@router.patch(
    "/{code}",
    response_model=Envelope[AdminPlanOut],
    summary="Edit a plan; a new token_limit applies to every subscription on it at once",
    responses={
        **_ADMIN_ERRORS,
        404: {"model": Envelope[None], "description": "No such plan"},
        422: {"model": Envelope[None], "description": "Invalid or unknown fields"},
    },
)
async def update_plan(
    code: PlanCodePath, body: PlanUpdate, session: DbSession, admin: AdminUser
) -> Envelope[AdminPlanOut]:
    plan = await service.update_plan(
        session, actor=admin.user, code=code, changes=body.model_dump(exclude_unset=True)
    )
    return ok(AdminPlanOut.of(plan))

"""HTTP routes of the subscriptions domain (thin: parse, call the service, wrap in the envelope)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from joyhub.auth.dependencies import CurrentUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok
from joyhub.subscriptions import service
from joyhub.subscriptions.schemas import PlanOut, SubscribeIn, SubscriptionOut

router = APIRouter()

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Envelope[None], "description": "Not authenticated"},
}


@router.get(
    "/plans", response_model=Envelope[list[PlanOut]], summary="The plan catalog (active plans, by rank)"
)
async def list_plans(session: DbSession) -> Envelope[list[PlanOut]]:
    return ok([PlanOut.of(p) for p in await service.list_plans(session)])


@router.get(
    "/current",
    response_model=Envelope[SubscriptionOut | None],
    summary="The caller's subscription (data: null when never subscribed)",
    responses=_AUTH_ERRORS,
)
async def current_subscription(
    session: DbSession, principal: CurrentUser
) -> Envelope[SubscriptionOut | None]:
    return ok(await service.current(session, principal.id, utcnow()))


@router.post(
    "",
    response_model=Envelope[SubscriptionOut],
    status_code=status.HTTP_200_OK,
    summary="Subscribe, or change plan (upgrade at once, downgrade at period end)",
    responses={
        201: {"model": Envelope[SubscriptionOut], "description": "A new subscription period started"},
        **_AUTH_ERRORS,
        422: {"model": Envelope[None], "description": "Unknown or inactive plan, or a malformed body"},
    },
)
async def subscribe(
    body: SubscribeIn, session: DbSession, principal: CurrentUser, response: Response
) -> Envelope[SubscriptionOut]:
    result = await service.change_plan(
        session, actor=principal.user, user_id=principal.id, plan_code=body.plan, now=utcnow()
    )
    if result.started_new_period:
        response.status_code = status.HTTP_201_CREATED
    return ok(result.subscription)


@router.post(
    "/cancel",
    response_model=Envelope[SubscriptionOut],
    summary="Cancel at the end of the current period (idempotent)",
    responses={
        **_AUTH_ERRORS,
        404: {"model": Envelope[None], "description": "The caller never subscribed"},
        409: {"model": Envelope[None], "description": "The subscription has already ended"},
    },
)
async def cancel(session: DbSession, principal: CurrentUser) -> Envelope[SubscriptionOut]:
    return ok(await service.cancel(session, actor=principal.user, user_id=principal.id, now=utcnow()))


@router.post(
    "/resume",
    response_model=Envelope[SubscriptionOut],
    summary="Undo a pending cancellation before the period ends",
    responses={
        **_AUTH_ERRORS,
        404: {"model": Envelope[None], "description": "The caller never subscribed"},
        409: {"model": Envelope[None], "description": "The subscription has already ended"},
    },
)
async def resume(session: DbSession, principal: CurrentUser) -> Envelope[SubscriptionOut]:
    return ok(await service.resume(session, actor=principal.user, user_id=principal.id, now=utcnow()))

"""Admin routes: granting a plan to a user (API.md §7, `PUT /admin/users/{id}/subscription`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from joyhub.auth.dependencies import AdminUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.envelope import Envelope, ok
from joyhub.subscriptions import service
from joyhub.subscriptions.schemas import GrantIn, SubscriptionOut

router = APIRouter()


@router.put(
    "/{user_id}/subscription",
    response_model=Envelope[SubscriptionOut],
    summary="Put a user on a plan now (new period from now), optionally until expires_at",
    responses={
        401: {"model": Envelope[None], "description": "Not authenticated"},
        403: {"model": Envelope[None], "description": "Not an administrator"},
        404: {"model": Envelope[None], "description": "No such user"},
        422: {
            "model": Envelope[None],
            "description": "Unknown or inactive plan, or expires_at not in the future",
        },
    },
)
async def grant_subscription(
    user_id: uuid.UUID, body: GrantIn, session: DbSession, admin: AdminUser
) -> Envelope[SubscriptionOut]:
    return ok(
        await service.grant(
            session,
            admin=admin.user,
            user_id=user_id,
            plan_code=body.plan,
            expires_at=body.expires_at,
            now=utcnow(),
        )
    )

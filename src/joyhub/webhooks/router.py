"""HTTP routes of webhooks and notifications (API.md §11): thin — parse, call the service, wrap.

The endpoint routes exist twice with the same shape: `/users/me/webhooks…` for a user's own
endpoints and `/admin/webhooks…` for the platform's. `endpoint_routes(owner)` builds them once
for a given owner dependency; who may call them is in those two dependencies' signatures
(`user_owner`: `CurrentUser`, an access token or an API key; `admin_owner`: `AdminUser`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from joyhub.auth.dependencies import AdminUser, CurrentUser
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.egress import EgressPolicy
from joyhub.core.envelope import Envelope, ok, page
from joyhub.core.pagination import PageParams
from joyhub.webhooks import notifications, service
from joyhub.webhooks.schemas import (
    DeliveryOut,
    DeliveryStatus,
    EndpointCreateIn,
    EndpointOut,
    EndpointUpdateIn,
    EndpointWithSecretOut,
    NotificationsOut,
    NotificationsUpdateIn,
)
from joyhub.webhooks.service import Owner


async def user_owner(principal: CurrentUser) -> Owner:
    """`/users/me/webhooks`: the caller's own endpoints."""
    return Owner(principal.user, "user")


async def admin_owner(admin: AdminUser) -> Owner:
    """`/admin/webhooks`: the platform's endpoints (admins only)."""
    return Owner(admin.user, "admin")


async def egress_policy(request: Request) -> EgressPolicy:
    return EgressPolicy.from_settings(request.app.state.settings)


Egress = Annotated[EgressPolicy, Depends(egress_policy)]


def _doc(code: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Envelope[None], "description": description}}


_AUTH = {**_doc(401, "Not authenticated"), **_doc(403, "Not an administrator (admin routes)")}
_NOT_FOUND = _doc(404, "No such endpoint (or not the caller's)")
_DISABLED = _doc(409, "The endpoint is disabled")


def endpoint_routes(owner_of: Callable[..., Awaitable[Owner]]) -> APIRouter:
    """The eight endpoint routes of §11 for the endpoints `owner_of` says the caller manages."""
    router = APIRouter()
    caller = Depends(owner_of)

    @router.get("", response_model=Envelope[list[EndpointOut]], summary="Webhook endpoints", responses=_AUTH)
    async def list_endpoints(session: DbSession, owner: Owner = caller) -> Envelope[list[EndpointOut]]:
        return ok([service.endpoint_out(e) for e in await service.list_endpoints(session, owner)])

    @router.post(
        "",
        status_code=201,
        response_model=Envelope[EndpointWithSecretOut],
        summary="Create an endpoint; its secret (whsec_…) is in this response only",
        responses={**_AUTH, **_doc(409, "At most 10 endpoints")},
    )
    async def create_endpoint(
        body: EndpointCreateIn,
        session: DbSession,
        request: Request,
        egress: Egress,
        owner: Owner = caller,
    ) -> Envelope[EndpointWithSecretOut]:
        endpoint, secret = await service.create_endpoint(
            session, owner, body, settings=request.app.state.settings, egress=egress, now=utcnow()
        )
        return ok(EndpointWithSecretOut(**service.endpoint_out(endpoint).model_dump(), secret=secret))

    @router.patch(
        "/{endpoint_id}",
        response_model=Envelope[EndpointOut],
        summary="Change an endpoint (is_active: false stops it; true re-enables a disabled one)",
        responses={**_AUTH, **_NOT_FOUND},
    )
    async def update_endpoint(
        endpoint_id: uuid.UUID,
        body: EndpointUpdateIn,
        session: DbSession,
        request: Request,
        egress: Egress,
        owner: Owner = caller,
    ) -> Envelope[EndpointOut]:
        endpoint = await service.update_endpoint(
            session,
            owner,
            endpoint_id,
            body,
            settings=request.app.state.settings,
            egress=egress,
            now=utcnow(),
        )
        return ok(service.endpoint_out(endpoint))

    @router.delete(
        "/{endpoint_id}",
        status_code=204,
        response_class=Response,
        summary="Delete an endpoint; its pending deliveries are never attempted",
        responses={**_AUTH, **_NOT_FOUND},
    )
    async def delete_endpoint(endpoint_id: uuid.UUID, session: DbSession, owner: Owner = caller) -> Response:
        await service.delete_endpoint(session, owner, endpoint_id)
        return Response(status_code=204)

    @router.post(
        "/{endpoint_id}/rotate-secret",
        response_model=Envelope[EndpointWithSecretOut],
        summary="A new secret (shown once); the previous one also signs for 24 h",
        responses={**_AUTH, **_NOT_FOUND},
    )
    async def rotate_secret(
        endpoint_id: uuid.UUID,
        session: DbSession,
        request: Request,
        owner: Owner = caller,
    ) -> Envelope[EndpointWithSecretOut]:
        endpoint, secret = await service.rotate_secret(
            session, owner, endpoint_id, settings=request.app.state.settings, now=utcnow()
        )
        return ok(EndpointWithSecretOut(**service.endpoint_out(endpoint).model_dump(), secret=secret))

    @router.post(
        "/{endpoint_id}/test",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Envelope[DeliveryOut],
        summary="Send a webhook.test event to the endpoint (the delivery is returned, pending)",
        responses={**_AUTH, **_NOT_FOUND, **_DISABLED},
    )
    async def send_test(
        endpoint_id: uuid.UUID, session: DbSession, owner: Owner = caller
    ) -> Envelope[DeliveryOut]:
        return ok(await service.send_test(session, owner, endpoint_id, utcnow()))

    @router.get(
        "/{endpoint_id}/deliveries",
        response_model=Envelope[list[DeliveryOut]],
        summary="The endpoint's deliveries, newest first (kept 30 days)",
        responses={**_AUTH, **_NOT_FOUND},
    )
    async def list_deliveries(
        endpoint_id: uuid.UUID,
        session: DbSession,
        paging: PageParams,
        status: Annotated[DeliveryStatus | None, Query(description="Only deliveries in this status")] = None,
        owner: Owner = caller,
    ) -> Envelope[list[DeliveryOut]]:
        items, total = await service.list_deliveries(session, owner, endpoint_id, status=status, page=paging)
        return page(items, offset=paging.offset, limit=paging.limit, total=total)

    @router.post(
        "/{endpoint_id}/deliveries/{delivery_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=Envelope[DeliveryOut],
        summary="Attempt a delivery again now",
        responses={**_AUTH, **_doc(404, "No such endpoint or delivery (or not the caller's)"), **_DISABLED},
    )
    async def retry_delivery(
        endpoint_id: uuid.UUID,
        delivery_id: uuid.UUID,
        session: DbSession,
        owner: Owner = caller,
    ) -> Envelope[DeliveryOut]:
        return ok(await service.retry_delivery(session, owner, endpoint_id, delivery_id, utcnow()))

    return router


# mounted under /api/v1/users (the caller's own) and /api/v1/admin (the platform's)
user_router = APIRouter()
user_router.include_router(endpoint_routes(user_owner), prefix="/me/webhooks")
admin_router = endpoint_routes(admin_owner)


@user_router.get(
    "/me/notifications",
    response_model=Envelope[NotificationsOut],
    summary="Quota alert settings (defaults: emails on, thresholds [80, 100])",
    responses=_doc(401, "Not authenticated"),
)
async def get_notifications(session: DbSession, principal: CurrentUser) -> Envelope[NotificationsOut]:
    return ok(await notifications.get_preferences(session, principal.id))


@user_router.patch(
    "/me/notifications",
    response_model=Envelope[NotificationsOut],
    summary="Change quota alert settings (thresholds: 1-100, at most 10)",
    responses=_doc(401, "Not authenticated"),
)
async def update_notifications(
    body: NotificationsUpdateIn, session: DbSession, principal: CurrentUser
) -> Envelope[NotificationsOut]:
    changes = body.model_dump(exclude_unset=True)
    return ok(await notifications.update_preferences(session, principal.id, changes, utcnow()))

"""Webhook endpoints and their deliveries (API.md §11): the rules behind both sets of routes.

Whose endpoints a caller manages is an `Owner`: a user's own (`/users/me/webhooks`, scope
`user`), or the platform's (`/admin/webhooks`, scope `admin`: shared by every admin, created by
one of them, who is the one emailed if it gets disabled). An endpoint outside the caller's set —
another user's, or a platform one seen from `/users/me` — answers 404, as if it did not exist.

Every change is audited (target type `webhook`, the secret as "***" and the URL's query string
hidden, since receivers sometimes put a token there).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit
from joyhub.core.config import Settings
from joyhub.core.egress import EgressDenied, EgressPolicy
from joyhub.core.errors import Conflict, NotFound, ValidationFailed, field_error
from joyhub.core.pagination import Page
from joyhub.models import User, WebhookDelivery, WebhookEndpoint, WebhookEvent
from joyhub.webhooks import deliveries, events, policy
from joyhub.webhooks.schemas import DeliveryOut, EndpointCreateIn, EndpointOut, EndpointUpdateIn
from joyhub.webhooks.secret_box import new_secret, secret_box

Scope = Literal["user", "admin", "org"]


@dataclass(frozen=True)
class Owner:
    """The caller, and which set of endpoints the route manages."""

    user: User
    scope: Scope
    org_id: uuid.UUID | None = None  # scope `org`: the organization's endpoints (API.md §13)

    def visible(self) -> ColumnElement[bool]:
        if self.scope == "admin":
            return WebhookEndpoint.scope == "admin"
        if self.scope == "org":
            return (WebhookEndpoint.scope == "org") & (WebhookEndpoint.org_id == self.org_id)
        return (WebhookEndpoint.scope == "user") & (WebhookEndpoint.owner_id == self.user.id)

    @property
    def allowed_events(self) -> tuple[str, ...]:
        return events.ADMIN_EVENT_TYPES if self.scope == "admin" else events.USER_EVENT_TYPES


def endpoint_out(endpoint: WebhookEndpoint) -> EndpointOut:
    return EndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        description=endpoint.description,
        is_active=endpoint.is_active,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
    )


# --- checks -----------------------------------------------------------------------------------


def _check_events(owner: Owner, types: list[str]) -> None:
    refused = [t for t in types if t not in owner.allowed_events]
    if refused:
        raise ValidationFailed(
            details=[
                field_error("body.events", f"not available to this endpoint: {', '.join(refused)}"),
            ]
        )


async def _check_url(url: str, egress: EgressPolicy, settings: Settings) -> None:
    """The egress policy of tool endpoints (and https only in production, like them)."""
    if settings.environment == "production" and not url.startswith("https://"):
        raise ValidationFailed(details=[field_error("body.url", "must be an https:// URL in production")])
    try:
        await egress.check_url(url)
    except EgressDenied as exc:
        raise ValidationFailed(details=[field_error("body.url", f"not allowed: {exc}")]) from None


def _audit_url(url: str) -> str:
    """The URL without its query string (it may carry the receiver's token)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="***" if parts.query else ""))


def _record(
    session: AsyncSession, owner: Owner, action: str, endpoint_id: uuid.UUID, changes: dict[str, Any]
) -> None:
    audit.record(
        session,
        actor=owner.user,
        action=action,
        target_type="webhook",
        target_id=endpoint_id,
        changes={"scope": owner.scope, **changes},
    )


async def _lock_owner(session: AsyncSession, owner: Owner) -> None:
    """Serialise creations in one owner's set, so parallel ones cannot pass the limit."""
    owner_key = {"user": owner.user.id, "admin": "platform", "org": f"org:{owner.org_id}"}[owner.scope]
    key = f"joyhub.webhooks:{owner_key}"
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})


# --- endpoints --------------------------------------------------------------------------------


async def list_endpoints(session: AsyncSession, owner: Owner) -> list[WebhookEndpoint]:
    stmt = select(WebhookEndpoint).where(owner.visible()).order_by(WebhookEndpoint.created_at.desc())
    return list((await session.execute(stmt)).scalars())


async def get_endpoint(session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = (
        await session.execute(
            select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, owner.visible())
        )
    ).scalar_one_or_none()
    if endpoint is None:
        raise NotFound("No such webhook endpoint")
    return endpoint


async def create_endpoint(
    session: AsyncSession,
    owner: Owner,
    body: EndpointCreateIn,
    *,
    settings: Settings,
    egress: EgressPolicy,
    now: datetime,
) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (`whsec_…`, returned this once, stored encrypted)."""
    _check_events(owner, body.events)
    await _check_url(body.url, egress, settings)
    await _lock_owner(session, owner)
    count = (
        await session.execute(select(func.count()).select_from(WebhookEndpoint).where(owner.visible()))
    ).scalar_one()
    if count >= policy.MAX_ENDPOINTS:
        raise Conflict(f"At most {policy.MAX_ENDPOINTS} webhook endpoints; delete one first")
    shown, raw = new_secret()
    endpoint_id = uuid.uuid4()
    endpoint = WebhookEndpoint(
        id=endpoint_id,
        owner_id=owner.user.id,
        scope=owner.scope,
        org_id=owner.org_id,
        url=body.url,
        events=body.events,
        description=body.description,
        is_active=True,
        disabled_reason=None,
        secret=secret_box(settings.secret_key()).seal(endpoint_id, raw),
        created_at=now,
        updated_at=now,
    )
    session.add(endpoint)
    await session.flush()
    _record(
        session,
        owner,
        "webhook.create",
        endpoint_id,
        {"url": _audit_url(body.url), "events": body.events, "secret": "***"},
    )
    return endpoint, shown


async def update_endpoint(
    session: AsyncSession,
    owner: Owner,
    endpoint_id: uuid.UUID,
    body: EndpointUpdateIn,
    *,
    settings: Settings,
    egress: EgressPolicy,
    now: datetime,
) -> WebhookEndpoint:
    """Change what was sent. Disabling fails the pending deliveries; enabling clears the reason
    and the failure streak (deliveries that failed meanwhile can be retried by hand)."""
    changes = body.model_dump(exclude_unset=True)
    endpoint = await _locked(session, owner, endpoint_id)
    if "events" in changes:
        _check_events(owner, changes["events"])
    if "url" in changes and changes["url"] != endpoint.url:
        await _check_url(changes["url"], egress, settings)
    before = _snapshot(endpoint)
    for field, value in changes.items():
        setattr(endpoint, field, value)
    if changes.get("is_active") is True and before["is_active"] is False:
        endpoint.disabled_reason = None
        endpoint.failing_since = None
    diff = audit.diff(before, _snapshot(endpoint))
    if diff:
        endpoint.updated_at = now
        await session.flush()
        if changes.get("is_active") is False and before["is_active"] is True:
            await deliveries.fail_pending(session, endpoint.id, reason="endpoint disabled", now=now)
        if "url" in diff:
            diff["url"] = {k: _audit_url(v) for k, v in diff["url"].items()}
        _record(session, owner, "webhook.update", endpoint.id, diff)
    return endpoint


def _snapshot(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "events": list(endpoint.events),
        "description": endpoint.description,
        "is_active": endpoint.is_active,
    }


async def _locked(session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = (
        await session.execute(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id, owner.visible())
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if endpoint is None:
        raise NotFound("No such webhook endpoint")
    return endpoint


async def delete_endpoint(session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID) -> None:
    """Delete it with its deliveries: nothing pending is attempted afterwards (a delivery in
    flight at that moment finishes, and its outcome is not recorded)."""
    endpoint = await _locked(session, owner, endpoint_id)
    await session.delete(endpoint)
    await session.flush()
    _record(session, owner, "webhook.delete", endpoint_id, {"url": _audit_url(endpoint.url)})


async def rotate_secret(
    session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID, *, settings: Settings, now: datetime
) -> tuple[WebhookEndpoint, str]:
    """A new secret now; the current one keeps signing too for ROTATION_OVERLAP (24 h), so the
    receiver can switch at its own pace. Rotating again within that window drops the oldest."""
    endpoint = await _locked(session, owner, endpoint_id)
    shown, raw = new_secret()
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + policy.ROTATION_OVERLAP
    endpoint.secret = secret_box(settings.secret_key()).seal(endpoint.id, raw)
    endpoint.updated_at = now
    await session.flush()
    _record(session, owner, "webhook.rotate_secret", endpoint.id, {"secret": "***"})
    return endpoint, shown


# --- deliveries --------------------------------------------------------------------------------


async def send_test(
    session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID, now: datetime
) -> DeliveryOut:
    """A `webhook.test` event with its one delivery, due now (the event's NOTIFY wakes the
    dispatchers at commit)."""
    endpoint = await _active(session, owner, endpoint_id)
    event = events.emit(
        session, events.WEBHOOK_TEST, user_id=owner.user.id, data={}, now=now, endpoint_id=endpoint.id
    )
    event.fanned_out_at = now
    await session.flush()  # the event row first: the delivery refers to it
    delivery = WebhookDelivery(
        id=uuid.uuid4(),
        endpoint_id=endpoint.id,
        event_id=event.id,
        status="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(delivery)
    await session.flush()
    if owner.scope == "admin":
        _record(session, owner, "webhook.test", endpoint.id, {"delivery_id": str(delivery.id)})
    return delivery_out(delivery, event)


async def _active(session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = await get_endpoint(session, owner, endpoint_id)
    if not endpoint.is_active:
        raise Conflict("The endpoint is disabled; enable it first")
    return endpoint


def delivery_out(delivery: WebhookDelivery, event: WebhookEvent) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        event_id=events.public_id(event.id),
        event_type=event.type,
        status=delivery.status,  # type: ignore[arg-type]
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        next_attempt_at=delivery.next_attempt_at,
        created_at=delivery.created_at,
    )


async def list_deliveries(
    session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID, *, status: str | None, page: Page
) -> tuple[list[DeliveryOut], int]:
    """The endpoint's deliveries, newest first (kept RETENTION, 30 days)."""
    await get_endpoint(session, owner, endpoint_id)
    where = [WebhookDelivery.endpoint_id == endpoint_id]
    if status is not None:
        where.append(WebhookDelivery.status == status)
    total = (
        await session.execute(select(func.count()).select_from(WebhookDelivery).where(*where))
    ).scalar_one()
    rows = (
        await session.execute(
            select(WebhookDelivery, WebhookEvent)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(*where)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).all()
    return [delivery_out(d, e) for d, e in rows], int(total)


async def retry_delivery(
    session: AsyncSession, owner: Owner, endpoint_id: uuid.UUID, delivery_id: uuid.UUID, now: datetime
) -> DeliveryOut:
    """Attempt the delivery again now (any status; a succeeded one is sent again). If that
    attempt fails, whatever is left of the retry schedule follows; with nothing left, it fails."""
    await _active(session, owner, endpoint_id)
    row = (
        await session.execute(
            select(WebhookDelivery, WebhookEvent)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id)
            .with_for_update(of=WebhookDelivery)
        )
    ).one_or_none()
    if row is None:
        raise NotFound("No such delivery")
    delivery, event = row
    delivery.status = "pending"
    delivery.next_attempt_at = now
    delivery.updated_at = now
    await session.flush()
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": events.NOTIFY_CHANNEL})
    if owner.scope == "admin":
        _record(session, owner, "webhook.delivery_retry", endpoint_id, {"delivery_id": str(delivery_id)})
    return delivery_out(delivery, event)

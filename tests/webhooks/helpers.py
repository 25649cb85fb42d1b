"""Helpers of the webhook tests: endpoints over HTTP, signature checks, direct DB reads."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from joyhub.webhooks import policy
from joyhub.webhooks.dispatcher import Dispatcher
from tests.webhooks.receiver import Received

API = "/api/v1"
ME = f"{API}/users/me/webhooks"
ADMIN = f"{API}/admin/webhooks"
USER_TYPES = [
    "quota.threshold_reached",
    "quota.period_reset",
    "subscription.created",
    "subscription.upgraded",
    "subscription.downgrade_scheduled",
    "subscription.cancelled",
    "subscription.resumed",
    "subscription.renewed",
    "subscription.ended",
    "subscription.expired",
]


async def create_endpoint(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    url: str,
    events: list[str] | None = None,
    *,
    base: str = ME,
    **extra: Any,
) -> tuple[str, str]:
    """A new endpoint over HTTP: (its id, its secret)."""
    r = await client.post(base, json={"url": url, "events": events or USER_TYPES, **extra}, headers=headers)
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    return data["id"], data["secret"]


def verify(received: Received, *secrets: str) -> dict[str, Any]:
    """The delivery's event, after `standardwebhooks` verified it with each secret given."""
    doc: dict[str, Any] = {}
    for secret in secrets:
        doc = Webhook(secret).verify(received.body, received.headers)
    return doc


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


async def eventually(check: Callable[[], Awaitable[bool]], *apps: Any, timeout: float = 20) -> None:
    """Wait (bounded) until `check()` holds, re-checking after each pass of the apps' dispatchers.

    For state only the database shows (a delivery recorded, an endpoint disabled, an email
    queued): the dispatchers write it from their own tasks, and each pass they finish wakes us.
    """
    dispatchers: list[Dispatcher] = [app.state.webhooks for app in apps]
    async with asyncio.timeout(timeout):
        while True:
            marks = [d.generation for d in dispatchers]
            if await check():
                return
            waits = [asyncio.ensure_future(d.progressed(m)) for d, m in zip(dispatchers, marks, strict=True)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()


async def all_recorded(engine: AsyncEngine, *apps: Any) -> None:
    """Wait until no delivery is pending: every attempt made so far is recorded. Tests that move
    the clock far ahead wait for this first, or the lease of an attempt still being recorded
    would expire in the jump and the delivery would (rightly, at least once) be sent again."""

    async def none_pending() -> bool:
        return not await rows(engine, "SELECT 1 FROM webhook_deliveries WHERE status = 'pending'")

    await eventually(none_pending, *apps)


def is_recorded(state: Any) -> bool:
    """No attempt of this delivery is in flight: a claim sets `next_attempt_at` exactly one
    lease after `updated_at` (both from the claim's "now"); a recorded outcome never does."""
    in_flight = state.status == "pending" and state.next_attempt_at - state.updated_at == policy.CLAIM_LEASE
    return not in_flight and (state.attempts > 0 or state.status != "pending")


async def delivery_states(engine: AsyncEngine, endpoint_id: str) -> list[Any]:
    return await rows(
        engine,
        "SELECT d.id, d.status, d.attempts, d.last_status_code, d.last_error, d.next_attempt_at,"
        " d.updated_at, e.type"
        " FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id"
        " WHERE d.endpoint_id = :e ORDER BY d.created_at",
        e=uuid.UUID(endpoint_id),
    )

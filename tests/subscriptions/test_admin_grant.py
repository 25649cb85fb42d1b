"""`PUT /admin/users/{user_id}/subscription`: an admin puts a user on a plan now (API.md §7)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.factories import make_account, make_admin, make_subscription
from tests.subscriptions.helpers import (
    SUBS,
    audit_rows,
    auth,
    grant_url,
    make_api_key,
    set_plan,
    sub_count,
    sub_row,
    ts,
)

pytestmark = pytest.mark.integration


async def test_grant_to_a_user_without_subscription(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    before = utcnow()
    r = await client.put(grant_url(user.user_id), json={"plan": "enterprise"}, headers=auth(admin))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["plan"], data["status"], data["tokens_used"], data["token_limit"], data["expires_at"]) == (
        "enterprise",
        "active",
        0,
        500_000,
        None,
    )
    assert ts(data["current_period_start"]) >= before
    assert ts(data["current_period_end"]) - ts(data["current_period_start"]) == timedelta(days=30)

    mine = (await client.get(f"{SUBS}/current", headers=auth(user))).json()["data"]
    assert mine == data
    [entry] = await audit_rows(engine, action="subscription.grant")
    assert (entry.actor_id, entry.actor_email) == (admin.user_id, admin.email)
    assert (entry.target_type, entry.target_id) == ("subscription", data["id"])
    assert entry.changes["user_id"] == str(user.user_id)
    assert entry.changes["plan"] == {"before": None, "after": "enterprise"}


async def test_grant_replaces_the_period_and_clears_pending_changes(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    sub_id = await make_subscription(
        engine,
        user.user_id,
        "enterprise",
        tokens_used=9_000,
        cancel_at_period_end=True,
        scheduled_plan_code="free",
    )
    clock.advance(timedelta(days=10))
    expires = utcnow() + timedelta(days=90)
    r = await client.put(
        grant_url(user.user_id), json={"plan": "pro", "expires_at": expires.isoformat()}, headers=auth(admin)
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["id"] == str(sub_id)
    assert (data["plan"], data["tokens_used"], data["cancel_at_period_end"], data["scheduled_plan"]) == (
        "pro",
        0,
        False,
        None,
    )
    assert ts(data["expires_at"]) == expires
    assert abs(ts(data["current_period_start"]) - utcnow()) < timedelta(minutes=1)
    assert await sub_count(engine, user.user_id) == 1
    [entry] = await audit_rows(engine, action="subscription.grant")
    assert entry.changes["plan"] == {"before": "enterprise", "after": "pro"}
    assert entry.changes["tokens_used"] == {"before": 9_000, "after": 0}


async def test_grant_restarts_an_ended_subscription(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", cancel_at_period_end=True)
    clock.advance(timedelta(days=40))
    r = await client.put(grant_url(user.user_id), json={"plan": "pro"}, headers=auth(admin))
    assert r.status_code == 200
    assert r.json()["data"]["status"] == "active"
    # the cancellation that took effect first is on record, then the grant
    actions = [e.action for e in await audit_rows(engine, target_type="subscription")]
    assert actions == ["subscription.cancelled", "subscription.grant"]


async def test_granted_plan_expires_at_expires_at(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    expires = utcnow() + timedelta(days=7)
    r = await client.put(
        grant_url(user.user_id), json={"plan": "pro", "expires_at": expires.isoformat()}, headers=auth(admin)
    )
    assert r.status_code == 200
    clock.advance(timedelta(days=6))
    assert (await client.get(f"{SUBS}/current", headers=auth(user))).json()["data"]["status"] == "active"
    clock.advance(timedelta(days=2))
    data = (await client.get(f"{SUBS}/current", headers=auth(user))).json()["data"]
    assert data["status"] == "expired"


async def test_user_changes_keep_the_admins_expiry(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    expires = utcnow() + timedelta(days=20)
    await client.put(
        grant_url(user.user_id), json={"plan": "pro", "expires_at": expires.isoformat()}, headers=auth(admin)
    )
    data = (await client.post(SUBS, json={"plan": "enterprise"}, headers=auth(user))).json()["data"]
    assert data["plan"] == "enterprise" and ts(data["expires_at"]) == expires


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "gold"}, "body.plan"),
        ({"plan": 3}, "body.plan"),
        ({}, "body.plan"),
        ({"plan": "pro", "expires_at": "2020-01-01T00:00:00+00:00"}, "body.expires_at"),
        ({"plan": "pro", "expires_at": "2999-01-01T00:00:00"}, "body.expires_at"),  # no offset
        ({"plan": "pro", "expires_at": "next week"}, "body.expires_at"),
        ({"plan": "pro", "tokens_used": 0}, "body.tokens_used"),
    ],
)
async def test_grant_rejects_bad_input(
    client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any], field: str
) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    r = await client.put(grant_url(user.user_id), json=body, headers=auth(admin))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"
    assert field in [d["field"] for d in r.json()["error"]["details"]]
    assert await sub_row(engine, user.user_id) is None


async def test_grant_of_an_inactive_plan_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    user = await make_account(engine)
    await set_plan(engine, "pro", is_active=False)
    r = await client.put(grant_url(user.user_id), json={"plan": "pro"}, headers=auth(admin))
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.plan"


async def test_grant_to_unknown_user_is_404(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.put(grant_url(uuid.uuid4()), json={"plan": "pro"}, headers=auth(admin))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "NOT_FOUND"
    r = await client.put(grant_url("not-a-uuid"), json={"plan": "pro"}, headers=auth(admin))
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "path.user_id"


async def test_grant_is_admin_only(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    url = grant_url(user.user_id)
    r = await client.put(url, json={"plan": "enterprise"})
    assert r.status_code == 401
    r = await client.put(url, json={"plan": "enterprise"}, headers=auth(user))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "FORBIDDEN"
    r = await client.put(url, json={"plan": "enterprise"}, headers={"X-API-Key": key})
    assert r.status_code == 403
    assert await sub_row(engine, user.user_id) is None
    assert await audit_rows(engine) == []

"""Plans as data: the public catalog, the admin view and edits that reach subscribers at once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.factories import make_account, make_admin, make_subscription
from tests.subscriptions.helpers import ADMIN_PLANS, SUBS, audit_rows, auth, make_api_key, plan_row, set_plan

pytestmark = pytest.mark.integration

PLAN_KEYS = {
    "code",
    "name",
    "description",
    "price_cents",
    "currency",
    "token_limit",
    "period_days",
    "features",
    "rank",
    "requests_per_minute",  # API.md §4.1
    "max_concurrent",
}


async def test_public_catalog_lists_active_plans_by_rank(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{SUBS}/plans")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    plans = body["data"]
    assert [p["code"] for p in plans] == ["free", "pro", "enterprise"]
    assert all(set(p) == PLAN_KEYS for p in plans)
    by_code = {p["code"]: p for p in plans}
    assert (by_code["free"]["price_cents"], by_code["free"]["token_limit"]) == (0, 1_000)
    assert (by_code["pro"]["price_cents"], by_code["pro"]["token_limit"]) == (1_900, 50_000)
    assert (by_code["enterprise"]["price_cents"], by_code["enterprise"]["token_limit"]) == (9_900, 500_000)
    assert all(p["currency"] == "USD" and p["period_days"] == 30 for p in plans)
    assert [p["rank"] for p in plans] == [0, 1, 2]
    assert all(isinstance(p["features"], list) and p["features"] for p in plans)


async def test_inactive_plan_hidden_from_catalog_but_shown_to_admins(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    r = await client.patch(f"{ADMIN_PLANS}/pro", json={"is_active": False}, headers=auth(admin))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["is_active"] is False

    public = (await client.get(f"{SUBS}/plans")).json()["data"]
    assert [p["code"] for p in public] == ["free", "enterprise"]

    r = await client.get(ADMIN_PLANS, headers=auth(admin))
    assert r.status_code == 200
    rows = r.json()["data"]
    assert [(p["code"], p["is_active"]) for p in rows] == [
        ("free", True),
        ("pro", False),
        ("enterprise", True),
    ]
    assert set(rows[0]) == PLAN_KEYS | {"is_active"}


async def test_patch_plan_updates_fields_and_audits_before_after(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    patch = {
        "name": "Pro+",
        "description": "More of everything.",
        "price_cents": 2_900,
        "token_limit": 75_000,
        "period_days": 31,
        "features": ["75,000 tokens", "Pro tools"],
    }
    r = await client.patch(f"{ADMIN_PLANS}/pro", json=patch, headers=auth(admin))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert {k: data[k] for k in patch} == patch
    assert (data["code"], data["rank"], data["currency"], data["is_active"]) == ("pro", 1, "USD", True)

    row = await plan_row(engine, "pro")
    assert (row.name, row.price_cents, row.token_limit, row.period_days) == ("Pro+", 2_900, 75_000, 31)

    [entry] = await audit_rows(engine, action="plan.update")
    assert entry.actor_id == admin.user_id
    assert entry.actor_email == admin.email
    assert (entry.target_type, entry.target_id) == ("plan", "pro")
    assert entry.changes["token_limit"] == {"before": 50_000, "after": 75_000}
    assert entry.changes["price_cents"] == {"before": 1_900, "after": 2_900}
    assert "is_active" not in entry.changes  # unchanged fields are not listed


async def test_patch_with_nothing_changing_writes_no_audit(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    r = await client.patch(f"{ADMIN_PLANS}/free", json={"token_limit": 1_000}, headers=auth(admin))
    assert r.status_code == 200
    r = await client.patch(f"{ADMIN_PLANS}/free", json={}, headers=auth(admin))
    assert r.status_code == 200
    assert await audit_rows(engine, action="plan.update") == []


async def test_new_token_limit_reaches_existing_subscriptions_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    alice = await make_account(engine)
    bob = await make_account(engine)
    carol = await make_account(engine)
    await make_subscription(engine, alice.user_id, "pro", tokens_used=40_000)
    await make_subscription(engine, bob.user_id, "pro", tokens_used=10_000)
    await make_subscription(engine, carol.user_id, "free", tokens_used=10)

    r = await client.patch(f"{ADMIN_PLANS}/pro", json={"token_limit": 30_000}, headers=auth(admin))
    assert r.status_code == 200

    a = (await client.get(f"{SUBS}/current", headers=auth(alice))).json()["data"]
    b = (await client.get(f"{SUBS}/current", headers=auth(bob))).json()["data"]
    c = (await client.get(f"{SUBS}/current", headers=auth(carol))).json()["data"]
    assert (a["token_limit"], a["tokens_used"], a["tokens_remaining"]) == (30_000, 40_000, 0)
    assert (b["token_limit"], b["tokens_remaining"]) == (30_000, 20_000)
    assert (c["token_limit"], c["tokens_remaining"]) == (1_000, 990)

    await client.patch(f"{ADMIN_PLANS}/pro", json={"token_limit": 60_000}, headers=auth(admin))
    a = (await client.get(f"{SUBS}/current", headers=auth(alice))).json()["data"]
    assert (a["token_limit"], a["tokens_remaining"]) == (60_000, 20_000)


async def test_deactivated_plan_keeps_existing_subscribers_renewing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", tokens_used=5)
    await set_plan(engine, "pro", is_active=False)
    clock.advance(timedelta(days=31))
    data = (await client.get(f"{SUBS}/current", headers=auth(user))).json()["data"]
    assert (data["plan"], data["status"], data["tokens_used"]) == ("pro", "active", 0)
    # ...but nobody can (re)subscribe to it
    r = await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.plan"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"token_limit": -1}, "body.token_limit"),
        ({"price_cents": -100}, "body.price_cents"),
        ({"period_days": 0}, "body.period_days"),
        ({"period_days": -30}, "body.period_days"),
        ({"period_days": 100_000}, "body.period_days"),
        ({"price_cents": 2**40}, "body.price_cents"),
        ({"token_limit": "100"}, "body.token_limit"),
        ({"token_limit": 1.5}, "body.token_limit"),
        ({"token_limit": True}, "body.token_limit"),
        ({"token_limit": None}, "body.token_limit"),
        ({"is_active": "yes"}, "body.is_active"),
        ({"is_active": 1}, "body.is_active"),
        ({"name": ""}, "body.name"),
        ({"name": "x" * 101}, "body.name"),
        ({"name": None}, "body.name"),
        ({"name": 5}, "body.name"),
        ({"name": "bad\x00name"}, "body.name"),
        ({"description": "d" * 2_001}, "body.description"),
        ({"features": "fast"}, "body.features"),
        ({"features": [f"f{i}" for i in range(51)]}, "body.features"),
        ({"features": ["x" * 201]}, "body.features.0"),
        ({"features": ["ok", 3]}, "body.features.1"),
        ({"features": ["ok", "nul\x00"]}, "body.features"),
        ({"rank": 5}, "body.rank"),
        ({"code": "gold"}, "body.code"),
        ({"currency": "EUR"}, "body.currency"),
        ({"token_limt": 10}, "body.token_limt"),
    ],
)
async def test_patch_plan_rejects_bad_input(
    client: httpx.AsyncClient, engine: AsyncEngine, patch: dict[str, Any], field: str
) -> None:
    admin = await make_admin(engine)
    r = await client.patch(f"{ADMIN_PLANS}/pro", json=patch, headers=auth(admin))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["data"] is None
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert field in [d["field"] for d in body["error"]["details"]], body
    row = await plan_row(engine, "pro")
    assert (row.token_limit, row.price_cents, row.name, row.period_days) == (50_000, 1_900, "Pro", 30)
    assert await audit_rows(engine, action="plan.update") == []


async def test_patch_plan_unknown_fields_are_named(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.patch(
        f"{ADMIN_PLANS}/pro", json={"token_limit": 5, "colour": "red"}, headers=auth(admin)
    )
    assert r.status_code == 422
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == "body.colour"
    assert detail["message"] == "Unknown field"


async def test_patch_unknown_plan_is_404(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.patch(f"{ADMIN_PLANS}/gold", json={"token_limit": 5}, headers=auth(admin))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "NOT_FOUND"
    r = await client.patch(f"{ADMIN_PLANS}/bad%00code", json={"token_limit": 5}, headers=auth(admin))
    assert r.status_code == 422
    r = await client.patch(f"{ADMIN_PLANS}/{'x' * 33}", json={"token_limit": 5}, headers=auth(admin))
    assert r.status_code == 422


async def test_patch_body_not_json_is_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    r = await client.patch(
        f"{ADMIN_PLANS}/pro",
        content=b"{not json",
        headers={**auth(admin), "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "MALFORMED_JSON"


async def test_admin_plan_routes_are_admin_only(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    calls = [("GET", ADMIN_PLANS, None), ("PATCH", f"{ADMIN_PLANS}/pro", {"token_limit": 1})]
    for method, url, body in calls:
        r = await client.request(method, url, json=body)
        assert r.status_code == 401, (method, url)
        assert r.json()["error"]["code"] == "NOT_AUTHENTICATED"
        r = await client.request(method, url, json=body, headers=auth(user))
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "FORBIDDEN"
        r = await client.request(method, url, json=body, headers={"X-API-Key": key})
        assert r.status_code == 403
        r = await client.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 403
    assert (await plan_row(engine, "pro")).token_limit == 50_000


async def test_admin_with_api_key_may_edit_plans(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    admin = await make_admin(engine)
    key = await make_api_key(engine, admin.user_id)
    r = await client.patch(f"{ADMIN_PLANS}/free", json={"token_limit": 2_000}, headers={"X-API-Key": key})
    assert r.status_code == 200
    assert r.json()["data"]["token_limit"] == 2_000

"""The subscription lifecycle over HTTP (API.md §4): every user-driven transition, its audit row."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.factories import make_account, make_subscription
from tests.subscriptions.helpers import (
    SUBS,
    audit_actions,
    audit_rows,
    auth,
    make_api_key,
    set_plan,
    set_sub,
    sub_count,
    sub_row,
    ts,
)

pytestmark = pytest.mark.integration

SUB_KEYS = {
    "id",
    "plan",
    "status",
    "token_limit",
    "tokens_used",
    "tokens_remaining",
    "current_period_start",
    "current_period_end",
    "cancel_at_period_end",
    "scheduled_plan",
    "expires_at",
    "created_at",
    "updated_at",
}


async def _post(client: httpx.AsyncClient, headers: dict[str, str], plan: str) -> httpx.Response:
    return await client.post(SUBS, json={"plan": plan}, headers=headers)


async def _current(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    r = await client.get(f"{SUBS}/current", headers=headers)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


async def test_current_is_null_when_never_subscribed(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    r = await client.get(f"{SUBS}/current", headers=auth(user))
    assert r.status_code == 200
    assert r.json() == {"data": None, "error": None, "meta": r.json()["meta"]}


async def test_subscription_routes_need_authentication(client: httpx.AsyncClient) -> None:
    for method, url, body in [
        ("GET", f"{SUBS}/current", None),
        ("POST", SUBS, {"plan": "pro"}),
        ("POST", f"{SUBS}/cancel", None),
        ("POST", f"{SUBS}/resume", None),
    ]:
        r = await client.request(method, url, json=body)
        assert r.status_code == 401, url
        assert r.json()["error"]["code"] == "NOT_AUTHENTICATED"
    r = await client.get(f"{SUBS}/current", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "INVALID_TOKEN"


async def test_first_subscribe_starts_a_period_now(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    before = utcnow()
    r = await _post(client, auth(user), "pro")
    after = utcnow()
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert set(data) == SUB_KEYS
    assert (
        data["plan"],
        data["status"],
        data["token_limit"],
        data["tokens_used"],
        data["tokens_remaining"],
    ) == (
        "pro",
        "active",
        50_000,
        0,
        50_000,
    )
    start, end = ts(data["current_period_start"]), ts(data["current_period_end"])
    assert before <= start <= after
    assert end - start == timedelta(days=30)
    assert data["cancel_at_period_end"] is False
    assert data["scheduled_plan"] is None and data["expires_at"] is None
    assert data["current_period_start"].endswith(("Z", "+00:00"))  # explicit UTC offset

    assert await _current(client, auth(user)) == data

    [entry] = await audit_rows(engine, action="subscription.create")
    assert (entry.actor_id, entry.target_type, entry.target_id) == (user.user_id, "subscription", data["id"])
    assert entry.changes["plan"] == {"before": None, "after": "pro"}
    assert entry.changes["user_id"] == str(user.user_id)


async def test_subscribe_works_with_an_api_key(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    key = await make_api_key(engine, user.user_id)
    r = await _post(client, {"X-API-Key": key}, "free")
    assert r.status_code == 201
    assert (await _current(client, {"X-API-Key": key}))["plan"] == "free"


async def test_same_plan_is_200_and_clears_pending_changes(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    first = (await _post(client, auth(user), "pro")).json()["data"]

    # nothing pending: unchanged, no audit row
    r = await _post(client, auth(user), "pro")
    assert r.status_code == 200
    assert r.json()["data"] == first
    assert await audit_actions(engine) == ["subscription.create"]

    assert (await client.post(f"{SUBS}/cancel", headers=auth(user))).status_code == 200
    assert (await _post(client, auth(user), "free")).json()["data"]["scheduled_plan"] == "free"
    r = await _post(client, auth(user), "pro")
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["plan"], data["cancel_at_period_end"], data["scheduled_plan"]) == ("pro", False, None)
    assert data["current_period_start"] == first["current_period_start"]
    assert await audit_actions(engine) == [
        "subscription.create",
        "subscription.cancel",
        "subscription.downgrade_scheduled",
        "subscription.same_plan",
    ]


async def test_upgrade_is_immediate_in_the_same_period_with_usage_kept(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    first = (await _post(client, auth(user), "free")).json()["data"]
    await set_sub(engine, user.user_id, tokens_used=800)
    clock.advance(timedelta(days=3))

    r = await _post(client, auth(user), "pro")
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["plan"], data["token_limit"], data["tokens_used"], data["tokens_remaining"]) == (
        "pro",
        50_000,
        800,
        49_200,
    )
    assert data["current_period_start"] == first["current_period_start"]
    assert data["current_period_end"] == first["current_period_end"]
    assert data["id"] == first["id"]
    [entry] = await audit_rows(engine, action="subscription.upgrade")
    assert entry.changes["plan"] == {"before": "free", "after": "pro"}
    assert entry.actor_id == user.user_id


async def test_upgrade_supersedes_a_scheduled_downgrade_but_keeps_a_pending_cancellation(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await _post(client, auth(user), "pro")
    await _post(client, auth(user), "free")
    await client.post(f"{SUBS}/cancel", headers=auth(user))
    data = (await _post(client, auth(user), "enterprise")).json()["data"]
    assert (data["plan"], data["scheduled_plan"], data["cancel_at_period_end"]) == ("enterprise", None, True)


async def test_downgrade_is_scheduled_and_applied_at_rollover(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    first = (await _post(client, auth(user), "enterprise")).json()["data"]
    await set_sub(engine, user.user_id, tokens_used=123_456)

    r = await _post(client, auth(user), "pro")
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["plan"], data["scheduled_plan"], data["token_limit"], data["tokens_used"]) == (
        "enterprise",
        "pro",
        500_000,
        123_456,
    )
    # a further downgrade replaces the scheduled one
    data = (await _post(client, auth(user), "free")).json()["data"]
    assert data["scheduled_plan"] == "free"
    data = (await _post(client, auth(user), "pro")).json()["data"]
    assert data["scheduled_plan"] == "pro"

    clock.advance(timedelta(days=30, seconds=1))
    data = await _current(client, auth(user))
    assert (data["plan"], data["scheduled_plan"], data["token_limit"], data["tokens_used"]) == (
        "pro",
        None,
        50_000,
        0,
    )
    assert ts(data["current_period_start"]) == ts(first["current_period_end"])
    assert ts(data["current_period_end"]) == ts(first["current_period_end"]) + timedelta(days=30)
    assert await audit_actions(engine) == [
        "subscription.create",
        "subscription.downgrade_scheduled",
        "subscription.downgrade_scheduled",
        "subscription.downgrade_scheduled",
        "subscription.downgrade_applied",
    ]
    [applied] = await audit_rows(engine, action="subscription.downgrade_applied")
    assert applied.actor_id is None
    assert applied.changes["plan"] == {"before": "enterprise", "after": "pro"}


async def test_cancel_then_period_end_makes_it_cancelled(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    first = (await _post(client, auth(user), "pro")).json()["data"]

    r = await client.post(f"{SUBS}/cancel", headers=auth(user))
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["status"], data["cancel_at_period_end"]) == ("active", True)
    # cancelling twice is harmless, and records nothing new
    r = await client.post(f"{SUBS}/cancel", headers=auth(user))
    assert r.status_code == 200
    assert r.json()["data"]["cancel_at_period_end"] is True
    assert len(await audit_rows(engine, action="subscription.cancel")) == 1

    clock.advance(timedelta(days=29))
    assert (await _current(client, auth(user)))["status"] == "active"
    clock.advance(timedelta(days=1, seconds=1))
    data = await _current(client, auth(user))
    assert (data["status"], data["cancel_at_period_end"], data["plan"]) == ("cancelled", False, "pro")
    assert data["current_period_end"] == first["current_period_end"]
    [ended] = await audit_rows(engine, action="subscription.cancelled")
    assert ended.actor_id is None

    # after the end: resume and cancel conflict
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "CONFLICT"
    r = await client.post(f"{SUBS}/cancel", headers=auth(user))
    assert r.status_code == 409

    # subscribing again starts a new period on the same row
    r = await _post(client, auth(user), "free")
    assert r.status_code == 201
    data = r.json()["data"]
    assert (data["status"], data["plan"], data["tokens_used"], data["id"]) == (
        "active",
        "free",
        0,
        first["id"],
    )
    assert ts(data["current_period_start"]) > ts(first["current_period_end"])
    assert await sub_count(engine, user.user_id) == 1


async def test_resume_before_the_end_undoes_the_cancellation(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await _post(client, auth(user), "pro")
    await client.post(f"{SUBS}/cancel", headers=auth(user))
    clock.advance(timedelta(days=10))
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 200
    assert r.json()["data"]["cancel_at_period_end"] is False
    # resuming twice is harmless
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 200
    assert [e.actor_id for e in await audit_rows(engine, action="subscription.resume")] == [user.user_id]

    clock.advance(timedelta(days=21))
    data = await _current(client, auth(user))
    assert (data["status"], data["plan"]) == ("active", "pro")
    assert "subscription.renew" in await audit_actions(engine)


async def test_cancel_and_resume_without_subscription_are_404(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    for action in ("cancel", "resume"):
        r = await client.post(f"{SUBS}/{action}", headers=auth(user))
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "NOT_FOUND"


async def test_cancel_exactly_at_the_period_end_is_too_late(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro")
    await client.post(f"{SUBS}/cancel", headers=auth(user))
    row = await sub_row(engine, user.user_id)
    assert row is not None
    clock.advance(row.current_period_end - utcnow())  # now == current_period_end
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 409


async def test_expired_subscription_can_be_started_again(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", expires_at=utcnow() + timedelta(days=5))
    clock.advance(timedelta(days=6))
    data = await _current(client, auth(user))
    assert data["status"] == "expired"
    r = await _post(client, auth(user), "pro")
    assert r.status_code == 201
    data = r.json()["data"]
    assert (data["status"], data["expires_at"], data["tokens_used"]) == ("active", None, 0)


async def test_parallel_first_subscribes_make_exactly_one_row(
    client: httpx.AsyncClient, make_client: Any, engine: AsyncEngine
) -> None:
    other = await make_client(own_engine=True)
    user = await make_account(engine)
    responses = await asyncio.gather(
        *(c.post(SUBS, json={"plan": "pro"}, headers=auth(user)) for c in [client, other] * 4)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 7 + [201], [r.text for r in responses]
    assert len({r.json()["data"]["id"] for r in responses}) == 1
    assert await sub_count(engine, user.user_id) == 1
    assert await audit_actions(engine) == ["subscription.create"]


async def test_parallel_different_plans_leave_one_consistent_row(
    client: httpx.AsyncClient, make_client: Any, engine: AsyncEngine
) -> None:
    other = await make_client(own_engine=True)
    user = await make_account(engine)
    plans = ["free", "pro", "enterprise", "pro", "free", "enterprise"]
    responses = await asyncio.gather(
        *(
            c.post(SUBS, json={"plan": p}, headers=auth(user))
            for c, p in zip([client, other] * 3, plans, strict=True)
        )
    )
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    assert sum(r.status_code == 201 for r in responses) == 1
    assert await sub_count(engine, user.user_id) == 1
    actions = await audit_actions(engine)
    assert actions[0] == "subscription.create" and actions.count("subscription.create") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"plan": "gold"}, "body.plan"),
        ({"plan": "PRO"}, "body.plan"),
        ({"plan": ""}, "body.plan"),
        ({"plan": "x" * 33}, "body.plan"),
        ({"plan": 1}, "body.plan"),
        ({"plan": None}, "body.plan"),
        ({"plan": ["pro"]}, "body.plan"),
        ({"plan": "pro\x00"}, "body.plan"),
        ({}, "body.plan"),
        ({"plan": "pro", "coupon": "FREE"}, "body.coupon"),
        ({"plan_code": "pro"}, "body.plan_code"),
    ],
)
async def test_subscribe_rejects_bad_input(
    client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any], field: str
) -> None:
    user = await make_account(engine)
    r = await client.post(SUBS, json=body, headers=auth(user))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in [d["field"] for d in error["details"]]
    assert all(d["message"] for d in error["details"])
    assert await sub_row(engine, user.user_id) is None
    assert await audit_rows(engine) == []


async def test_subscribe_to_an_inactive_plan_is_422(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    await set_plan(engine, "enterprise", is_active=False)
    r = await _post(client, auth(user), "enterprise")
    assert r.status_code == 422
    [detail] = r.json()["error"]["details"]
    assert detail["field"] == "body.plan"
    assert "not available" in detail["message"]
    # nor can an active subscriber upgrade into it
    await _post(client, auth(user), "free")
    r = await _post(client, auth(user), "enterprise")
    assert r.status_code == 422
    assert (await _current(client, auth(user)))["plan"] == "free"


async def test_subscribe_body_errors(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    r = await client.post(
        SUBS, content=b'{"plan": ', headers={**auth(user), "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "MALFORMED_JSON"
    r = await client.post(SUBS, headers=auth(user))
    assert r.status_code == 422
    r = await client.post(SUBS, json=["pro"], headers=auth(user))
    assert r.status_code == 422


async def test_unauthenticated_bad_body_is_still_401(client: httpx.AsyncClient) -> None:
    r = await client.post(SUBS, json={"plan": 5})
    assert r.status_code == 401

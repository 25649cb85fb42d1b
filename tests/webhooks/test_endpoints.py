"""The endpoint routes of API.md §11: validation, limits, visibility, secrets, egress, audit."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.config import Settings
from joyhub.core.egress import EgressDenied, EgressPolicy
from tests.factories import make_account, make_admin
from tests.subscriptions.helpers import auth
from tests.webhooks.helpers import ADMIN, ME, USER_TYPES, create_endpoint, rows, scalar
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration

URL = "https://hooks.example.com/joyhub"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": ["subscription.created"]}, "body.url"),
        ({"url": URL}, "body.events"),
        ({"url": URL, "events": []}, "body.events"),
        ({"url": URL, "events": "subscription.created"}, "body.events"),
        ({"url": URL, "events": ["subscription.nope"]}, "body.events"),
        ({"url": URL, "events": ["webhook.test"]}, "body.events"),
        ({"url": URL, "events": [1]}, "body.events.0"),
        ({"url": URL, "events": ["tool.circuit_opened"]}, "body.events"),  # admin endpoints only
        ({"url": 5, "events": ["subscription.created"]}, "body.url"),
        ({"url": "ftp://example.com/x", "events": ["subscription.created"]}, "body.url"),
        ({"url": "http://user:pw@example.com/x", "events": ["subscription.created"]}, "body.url"),
        ({"url": "https://example.com/a b", "events": ["subscription.created"]}, "body.url"),
        ({"url": "https://example.com/x#frag", "events": ["subscription.created"]}, "body.url"),
        ({"url": "https://" + "a" * 2100 + ".com", "events": ["subscription.created"]}, "body.url"),
        ({"url": URL, "events": ["subscription.created"], "description": "x" * 501}, "body.description"),
        ({"url": URL, "events": ["subscription.created"], "description": "a\x00b"}, "body.description"),
        ({"url": URL, "events": ["subscription.created"], "description": 7}, "body.description"),
        ({"url": URL, "events": ["subscription.created"], "secret": "whsec_mine"}, "body.secret"),
        ({"url": URL, "events": ["subscription.created"], "is_active": False}, "body.is_active"),
    ],
)
async def test_create_refuses_bad_bodies(
    client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any], field: str
) -> None:
    user = await make_account(engine)
    r = await client.post(ME, json=body, headers=auth(user))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in [d["field"] for d in error["details"]], error
    assert await scalar(engine, "SELECT count(*) FROM webhook_endpoints") == 0


async def test_create_shows_the_secret_once_and_stores_it_encrypted(
    client: httpx.AsyncClient, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    user = await make_account(engine)
    caplog.set_level(logging.DEBUG)
    r = await client.post(
        ME,
        json={"url": URL + "?token=abc", "events": ["subscription.created", "subscription.created"]},
        headers=auth(user),
    )
    assert r.status_code == 201
    data = r.json()["data"]
    secret = data["secret"]
    assert secret.startswith("whsec_") and len(secret) == len("whsec_") + 44
    assert data["events"] == ["subscription.created"]  # each type once
    assert set(data) == {
        "id",
        "url",
        "events",
        "description",
        "is_active",
        "disabled_reason",
        "created_at",
        "secret",
    }
    assert (data["is_active"], data["disabled_reason"], data["description"]) == (True, None, None)

    listed = (await client.get(ME, headers=auth(user))).json()["data"]
    assert [e["id"] for e in listed] == [data["id"]] and "secret" not in listed[0]
    rotated = (await client.post(f"{ME}/{data['id']}/rotate-secret", headers=auth(user))).json()["data"]
    patched = await client.patch(f"{ME}/{data['id']}", json={"description": "ops"}, headers=auth(user))
    assert "secret" not in patched.json()["data"]

    raw = secret.removeprefix("whsec_")
    stored = await rows(engine, "SELECT secret, previous_secret FROM webhook_endpoints")
    assert all(raw.encode() not in bytes(col) and raw not in bytes(col).hex() for col in stored[0])
    for record in caplog.records:
        line = record.getMessage() + json.dumps(record.__dict__, default=str)
        assert raw not in line and rotated["secret"].removeprefix("whsec_") not in line
    audit = await rows(
        engine,
        "SELECT action, changes::text FROM audit_logs WHERE target_type = 'webhook' ORDER BY created_at",
    )
    assert [a.action for a in audit] == ["webhook.create", "webhook.rotate_secret", "webhook.update"]
    assert all(raw not in a.changes and "token=abc" not in a.changes for a in audit)
    assert '"secret": "***"' in audit[0].changes and "?***" in audit[0].changes


async def test_at_most_ten_endpoints_even_when_created_in_parallel(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    body = {"url": URL, "events": ["subscription.created"]}
    responses = await asyncio.gather(*(client.post(ME, json=body, headers=auth(user)) for _ in range(14)))
    assert sorted(r.status_code for r in responses) == [201] * 10 + [409] * 4
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"CONFLICT"}
    assert len((await client.get(ME, headers=auth(user))).json()["data"]) == 10
    other = await make_account(engine)  # the limit is per user
    assert (await client.post(ME, json=body, headers=auth(other))).status_code == 201


async def test_another_users_endpoint_or_delivery_is_not_found(
    client: httpx.AsyncClient, engine: AsyncEngine, receiver: Receiver
) -> None:
    alice, bob, admin = await make_account(engine), await make_account(engine), await make_admin(engine)
    alice_endpoint, _ = await create_endpoint(client, auth(alice), receiver.url())
    bob_endpoint, _ = await create_endpoint(client, auth(bob), receiver.url())
    platform, _ = await create_endpoint(client, auth(admin), receiver.url(), base=ADMIN)
    r = await client.post(f"{ME}/{alice_endpoint}/test", headers=auth(alice))
    alice_delivery = r.json()["data"]["id"]

    for endpoint in (alice_endpoint, platform):  # bob sees neither alice's nor the platform's
        for method, path, body in [
            ("PATCH", f"{ME}/{endpoint}", {"description": "mine now"}),
            ("DELETE", f"{ME}/{endpoint}", None),
            ("POST", f"{ME}/{endpoint}/rotate-secret", None),
            ("POST", f"{ME}/{endpoint}/test", None),
            ("GET", f"{ME}/{endpoint}/deliveries", None),
            ("POST", f"{ME}/{endpoint}/deliveries/{alice_delivery}/retry", None),
        ]:
            r = await client.request(method, path, json=body, headers=auth(bob))
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "NOT_FOUND"
    # alice's delivery id through bob's own endpoint: 404 as well
    r = await client.post(f"{ME}/{bob_endpoint}/deliveries/{alice_delivery}/retry", headers=auth(bob))
    assert r.status_code == 404
    # a platform endpoint is not a user's, not even its creator's
    r = await client.get(f"{ME}/{platform}/deliveries", headers=auth(admin))
    assert r.status_code == 404
    assert [e["id"] for e in (await client.get(ME, headers=auth(bob))).json()["data"]] == [bob_endpoint]
    assert [e["id"] for e in (await client.get(ADMIN, headers=auth(admin))).json()["data"]] == [platform]
    assert (await client.get(f"{ME}/not-a-uuid/deliveries", headers=auth(bob))).status_code == 422
    # nothing was changed by the refused calls
    assert (
        await scalar(
            engine, "SELECT description FROM webhook_endpoints WHERE id = :i", i=uuid.UUID(alice_endpoint)
        )
        is None
    )


async def test_admin_routes_are_for_admins(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user, admin, other_admin = await make_account(engine), await make_admin(engine), await make_admin(engine)
    assert (await client.get(ADMIN)).status_code == 401
    r = await client.post(ADMIN, json={"url": URL, "events": ["tool.circuit_opened"]}, headers=auth(user))
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    endpoint_id, _ = await create_endpoint(
        client, auth(admin), URL, ["tool.circuit_opened", "tool.circuit_closed", *USER_TYPES], base=ADMIN
    )
    # platform endpoints are shared by the admins
    r = await client.patch(f"{ADMIN}/{endpoint_id}", json={"description": "pager"}, headers=auth(other_admin))
    assert r.status_code == 200 and r.json()["data"]["description"] == "pager"
    assert (await client.get(f"{ADMIN}/{endpoint_id}/deliveries", headers=auth(user))).status_code == 403
    actions = await rows(
        engine, "SELECT action, actor_id FROM audit_logs WHERE target_type = 'webhook' ORDER BY created_at"
    )
    assert [(a.action, a.actor_id) for a in actions] == [
        ("webhook.create", admin.user_id),
        ("webhook.update", other_admin.user_id),
    ]
    r = await client.get("/api/v1/admin/audit-logs?target_type=webhook", headers=auth(admin))
    assert r.status_code == 200 and r.json()["meta"]["pagination"]["total"] == 2


async def test_update_refuses_bad_bodies_and_changes_only_what_is_sent(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), URL, ["subscription.created"], description="a")
    for body, field in [
        ({"url": None}, "body.url"),
        ({"events": None}, "body.events"),
        ({"is_active": None}, "body.is_active"),
        ({"is_active": "false"}, "body.is_active"),
        ({"events": ["tool.circuit_closed"]}, "body.events"),
        ({"url": "javascript:alert(1)"}, "body.url"),
        ({"disabled_reason": "x"}, "body.disabled_reason"),
    ]:
        r = await client.patch(f"{ME}/{endpoint_id}", json=body, headers=auth(user))
        assert r.status_code == 422, (body, r.text)
        assert field in [d["field"] for d in r.json()["error"]["details"]]
    r = await client.patch(
        f"{ME}/{endpoint_id}", json={"events": ["quota.threshold_reached"]}, headers=auth(user)
    )
    assert r.status_code == 200
    data = r.json()["data"]
    assert (data["url"], data["events"], data["description"]) == (URL, ["quota.threshold_reached"], "a")
    r = await client.patch(f"{ME}/{endpoint_id}", json={"description": None}, headers=auth(user))
    assert r.json()["data"]["description"] is None


async def test_api_keys_may_manage_webhooks(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    r = await client.post(f"{ME[:-9]}/api-keys", json={"name": "ci"}, headers=auth(user))
    key = r.json()["data"]["key"]
    r = await client.post(
        ME, json={"url": URL, "events": ["subscription.created"]}, headers={"X-API-Key": key}
    )
    assert r.status_code == 201


async def test_production_applies_the_egress_policy(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    client = await make_client(
        environment="production", tool_allowed_networks="10.1.0.0/16", email_backend="smtp"
    )
    user = await make_account(engine)
    for url, reason in [
        ("http://hooks.example.com/x", "https"),
        ("https://127.0.0.1/x", "not allowed"),
        ("https://[::1]/x", "not allowed"),
        ("https://169.254.169.254/latest/meta-data", "not allowed"),
        ("https://10.2.3.4/x", "not allowed"),
        ("https://localhost/x", "not allowed"),
    ]:
        r = await client.post(ME, json={"url": url, "events": ["subscription.created"]}, headers=auth(user))
        assert r.status_code == 422, (url, r.text)
        [detail] = r.json()["error"]["details"]
        assert detail["field"] == "body.url" and reason in detail["message"], (url, detail)
    ok = await client.post(
        ME, json={"url": "https://10.1.2.3/x", "events": ["subscription.created"]}, headers=auth(user)
    )
    assert ok.status_code == 201  # an allowed private network


async def test_the_egress_policy_checks_the_address_dialled(settings: Settings) -> None:
    """At connect time too: DNS may change after a URL was saved."""
    policy = EgressPolicy.from_settings(settings.model_copy(update={"environment": "production"}))
    with pytest.raises(EgressDenied):
        await policy.check_url("https://127.0.0.1/x")
    import aiohttp

    async with aiohttp.ClientSession(connector=policy.connector()) as session:
        with pytest.raises(aiohttp.ClientConnectorError, match="egress"):
            await session.post("http://127.0.0.1:9/x")

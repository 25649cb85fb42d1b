"""Organizations' lifecycle: creation, the last owner, invitations by email (real SMTP), member
limits and roles, deletion, the platform admin's views, and the audit trail (API.md §13)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth.support import SmtpServer, smtp_server
from tests.factories import make_account, make_admin
from tests.orgs.helpers import API, invoke, make_org, org_key, org_ledger
from tests.tools.helpers import make_tool
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

TOKEN_IN_LINK = re.compile(r"invitations/accept\?token=([A-Za-z0-9_-]+)")


@pytest.fixture
async def mailbox() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as smtp:
        yield smtp


@pytest.fixture
async def client(make_client: Callable[..., Any], mailbox: SmtpServer) -> httpx.AsyncClient:
    c: httpx.AsyncClient = await make_client(
        email_backend="smtp", smtp_host="127.0.0.1", smtp_port=mailbox.port
    )
    return c


def _last_token(mailbox: SmtpServer) -> str:
    tokens = [t for body in mailbox.bodies() for t in TOKEN_IN_LINK.findall(body)]
    assert tokens, mailbox.bodies()
    return tokens[-1]


async def test_create_list_and_the_owned_limit(client: Any, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    made = await client.post(f"{API}/orgs", json={"name": "  Acme  "}, headers=user.headers)
    assert made.status_code == 201, made.text
    org = made.json()["data"]
    assert (org["name"], org["role"], org["member_count"], org["subscription"]) == ("Acme", "owner", 1, None)
    for i in range(9):
        assert (
            await client.post(f"{API}/orgs", json={"name": f"o{i}"}, headers=user.headers)
        ).status_code == 201
    eleventh = await client.post(f"{API}/orgs", json={"name": "one too many"}, headers=user.headers)
    assert (eleventh.status_code, eleventh.json()["error"]["code"]) == (409, "CONFLICT")
    listed = await client.get(f"{API}/orgs", headers=user.headers)
    assert listed.json()["meta"]["pagination"]["total"] == 10
    bad = await client.post(f"{API}/orgs", json={"name": "x", "role": "owner"}, headers=user.headers)
    assert bad.status_code == 422


async def test_the_last_owner_can_neither_leave_nor_be_demoted(client: Any, engine: AsyncEngine) -> None:
    org = await make_org(engine, admins=1, members=1)
    owner, admin = org.owner, org.of("admin")
    base = f"{API}/orgs/{org.id}/members"
    leave = await client.delete(f"{base}/{owner.user_id}", headers=owner.headers)
    assert (leave.status_code, leave.json()["error"]["code"]) == (409, "CONFLICT")
    demote = await client.patch(f"{base}/{owner.user_id}", json={"role": "admin"}, headers=owner.headers)
    assert demote.status_code == 409
    # admins cannot touch owners, nor make anyone an owner
    assert (
        await client.patch(f"{base}/{owner.user_id}", json={"token_limit": 5}, headers=admin.headers)
    ).status_code == 403
    assert (await client.delete(f"{base}/{owner.user_id}", headers=admin.headers)).status_code == 403
    promote = await client.patch(f"{base}/{admin.user_id}", json={"role": "owner"}, headers=admin.headers)
    assert promote.status_code == 403
    # with a second owner, the first may step down and leave
    promote = await client.patch(f"{base}/{admin.user_id}", json={"role": "owner"}, headers=owner.headers)
    assert promote.status_code == 200 and promote.json()["data"]["role"] == "owner"
    assert (
        await client.patch(f"{base}/{owner.user_id}", json={"role": "member"}, headers=owner.headers)
    ).status_code == 200
    assert (await client.delete(f"{base}/{owner.user_id}", headers=owner.headers)).status_code == 204
    # the remaining owner is now the last one
    assert (await client.delete(f"{base}/{admin.user_id}", headers=admin.headers)).status_code == 409
    # a member may leave by themself
    member = org.of("member")
    assert (await client.delete(f"{base}/{member.user_id}", headers=member.headers)).status_code == 204
    assert (await client.get(f"{API}/orgs/{org.id}", headers=member.headers)).status_code == 404


async def test_member_limits_are_set_cleared_and_shown(client: Any, engine: AsyncEngine) -> None:
    org = await make_org(engine)
    member = org.of("member")
    url = f"{API}/orgs/{org.id}/members/{member.user_id}"
    r = await client.patch(url, json={"token_limit": 500}, headers=org.of("admin").headers)
    assert r.json()["data"]["token_limit"] == 500
    r = await client.patch(url, json={"role": "admin"}, headers=org.of("admin").headers)
    assert r.json()["data"] | {"joined_at": None} == {
        "user_id": str(member.user_id),
        "email": member.email,
        "name": "Test User",
        "role": "admin",
        "token_limit": 500,
        "tokens_used": 0,
        "joined_at": None,
    }
    r = await client.patch(url, json={"token_limit": None}, headers=org.owner.headers)
    assert r.json()["data"]["token_limit"] is None
    assert (await client.patch(url, json={"token_limit": -1}, headers=org.owner.headers)).status_code == 422
    unknown = await client.patch(f"{API}/orgs/{org.id}/members/{org.id}", json={}, headers=org.owner.headers)
    assert unknown.status_code == 404


async def test_invitation_accept_and_its_edge_cases(
    client: Any, engine: AsyncEngine, mailbox: SmtpServer
) -> None:
    org = await make_org(engine, admins=1, members=0)
    admin = org.of("admin")
    invitee = await make_account(engine, email="Invitee@Example.com")
    invite = f"{API}/orgs/{org.id}/invitations"
    made = await client.post(
        invite, json={"email": "invitee@example.com", "role": "member"}, headers=admin.headers
    )
    assert made.status_code == 201, made.text
    token = _last_token(mailbox)
    assert token not in made.text  # the token is only in the email
    # an admin may not invite an owner
    assert (
        await client.post(invite, json={"email": "x@example.com", "role": "owner"}, headers=admin.headers)
    ).status_code == 403
    # wrong email: 403, and the invitation still works for the right person
    stranger = await make_account(engine)
    wrong = await client.post(f"{API}/invitations/accept", json={"token": token}, headers=stranger.headers)
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (403, "FORBIDDEN")
    ok = await client.post(f"{API}/invitations/accept", json={"token": token}, headers=invitee.headers)
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"]["role"] == "member" and ok.json()["data"]["member_count"] == 3
    # reused: 404
    again = await client.post(f"{API}/invitations/accept", json={"token": token}, headers=invitee.headers)
    assert again.status_code == 404
    # already a member: inviting them is a conflict
    dup = await client.post(invite, json={"email": "invitee@example.com"}, headers=admin.headers)
    assert dup.status_code == 409
    # revoked: 404
    other = await make_account(engine)
    await client.post(invite, json={"email": other.email}, headers=admin.headers)
    revoked_token = _last_token(mailbox)
    pending = (await client.get(invite, headers=admin.headers)).json()["data"]
    assert [p["email"] for p in pending] == [other.email]
    assert (await client.delete(f"{invite}/{pending[0]['id']}", headers=admin.headers)).status_code == 204
    assert (await client.delete(f"{invite}/{pending[0]['id']}", headers=admin.headers)).status_code == 404
    r = await client.post(f"{API}/invitations/accept", json={"token": revoked_token}, headers=other.headers)
    assert r.status_code == 404
    # expired: 404 after 7 days
    await client.post(invite, json={"email": other.email}, headers=admin.headers)
    late_token = _last_token(mailbox)
    async with engine.begin() as conn:  # 7 days later (the access token would have expired too)
        await conn.execute(
            text(
                "UPDATE organization_invitations SET expires_at = now() - interval '1 second'"
                " WHERE email = :e AND revoked_at IS NULL"
            ),
            {"e": other.email},
        )
    r = await client.post(f"{API}/invitations/accept", json={"token": late_token}, headers=other.headers)
    assert r.status_code == 404
    # already a member with a valid invitation (invited before joining another way): 409
    third = await make_account(engine)
    await client.post(invite, json={"email": third.email}, headers=admin.headers)
    t1 = _last_token(mailbox)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO organization_members (org_id, user_id, role, tokens_used, tokens_reserved,"
                " joined_at) VALUES (:o, :u, 'member', 0, 0, now())"
            ),
            {"o": org.id, "u": third.user_id},
        )
    r = await client.post(f"{API}/invitations/accept", json={"token": t1}, headers=third.headers)
    assert r.status_code == 409
    assert (
        await client.post(f"{API}/invitations/accept", json={"token": "nope"}, headers=third.headers)
    ).status_code == 404


async def test_deleting_an_org_ends_its_subscription_and_stops_its_keys(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, admins=1, members=1)
    tool = await make_tool(engine, upstream.url("/fast?tokens=2"))
    key = {"Authorization": f"Bearer {await org_key(client, org.id, org.of('admin'))}"}
    assert (await invoke(client, key, tool)).status_code == 200
    assert (await client.delete(f"{API}/orgs/{org.id}", headers=org.owner.headers)).status_code == 204
    assert (await invoke(client, key, tool)).status_code == 401
    assert (await invoke(client, org.of("member").headers, tool, org_id=org.id)).status_code == 404
    assert (await client.get(f"{API}/orgs/{org.id}", headers=org.owner.headers)).status_code == 404
    assert (await client.get(f"{API}/orgs", headers=org.owner.headers)).json()["data"] == []
    # the platform admin still sees it, its subscription ended, its history kept
    admin = await make_admin(engine)
    seen = (await client.get(f"{API}/admin/orgs/{org.id}", headers=admin.headers)).json()["data"]
    assert seen["deleted_at"] is not None and seen["subscription"]["status"] == "cancelled"
    assert (await org_ledger(engine, org.id)).log_tokens == 2


async def test_org_subscription_lifecycle_and_admin_grant(client: Any, engine: AsyncEngine) -> None:
    org = await make_org(engine, plan=None)
    owner = org.owner.headers
    base = f"{API}/orgs/{org.id}/subscription"
    assert (await client.get(base, headers=owner)).json()["data"] is None
    created = await client.post(base, json={"plan": "pro"}, headers=owner)
    assert created.status_code == 201 and created.json()["data"]["plan"] == "pro"
    up = await client.post(base, json={"plan": "enterprise"}, headers=owner)
    assert up.status_code == 200 and up.json()["data"]["plan"] == "enterprise"
    down = await client.post(base, json={"plan": "free"}, headers=owner)
    assert down.json()["data"]["scheduled_plan"] == "free"
    assert (await client.post(f"{base}/cancel", headers=owner)).json()["data"]["cancel_at_period_end"] is True
    assert (await client.post(f"{base}/resume", headers=owner)).json()["data"][
        "cancel_at_period_end"
    ] is False
    # rollover: a period later the scheduled downgrade applies
    async with engine.begin() as conn:  # the period is over
        await conn.execute(
            text(
                "UPDATE subscriptions SET current_period_start = now() - interval '30 days',"
                " current_period_end = now() - interval '1 second', tokens_used = 7 WHERE org_id = :o"
            ),
            {"o": org.id},
        )
    rolled = (await client.get(base, headers=org.of("member").headers)).json()["data"]
    assert rolled["plan"] == "free" and rolled["tokens_used"] == 0
    admin = await make_admin(engine)
    granted = await client.put(
        f"{API}/admin/orgs/{org.id}/subscription", json={"plan": "enterprise"}, headers=admin.headers
    )
    assert granted.status_code == 200 and granted.json()["data"]["plan"] == "enterprise"
    listed = (await client.get(f"{API}/admin/orgs", headers=admin.headers)).json()
    assert listed["meta"]["pagination"]["total"] == 1
    assert listed["data"][0]["owners"] == [org.owner.email]
    assert (await client.get(f"{API}/admin/orgs", headers=org.owner.headers)).status_code == 403
    # the personal subscription of the owner was never touched
    assert (await client.get(f"{API}/subscriptions/current", headers=owner)).json()["data"] is None
    # every change is audited with target_type organization or subscription
    audit = (await client.get(f"{API}/admin/audit-logs?limit=100", headers=admin.headers)).json()["data"]
    actions = {a["action"] for a in audit}
    assert {"subscription.create", "subscription.upgrade", "subscription.grant"} <= actions


async def test_changes_are_audited_as_organization(
    client: Any, engine: AsyncEngine, mailbox: SmtpServer
) -> None:
    user = await make_account(engine)
    org_id = (await client.post(f"{API}/orgs", json={"name": "A"}, headers=user.headers)).json()["data"]["id"]
    await client.patch(f"{API}/orgs/{org_id}", json={"name": "B"}, headers=user.headers)
    await client.post(
        f"{API}/orgs/{org_id}/invitations", json={"email": "z@example.com"}, headers=user.headers
    )
    await client.post(f"{API}/orgs/{org_id}/api-keys", json={"name": "k"}, headers=user.headers)
    await client.delete(f"{API}/orgs/{org_id}", headers=user.headers)
    admin = await make_admin(engine)
    rows = (
        await client.get(f"{API}/admin/audit-logs?target_type=organization&limit=100", headers=admin.headers)
    ).json()["data"]
    assert {r["action"] for r in rows} == {
        "organization.create",
        "organization.update",
        "organization.invitation_create",
        "organization.api_key_create",
        "organization.delete",
    }
    assert all(r["target_id"] == org_id for r in rows)
    assert all(len(str(r["changes"].get("key_prefix", ""))) <= 12 for r in rows)  # never the key

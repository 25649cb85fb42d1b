"""Which subscription a call bills (API.md §13), per-member limits, and the ledger's exactness."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import make_account
from tests.orgs.helpers import API, add_member, invoke, make_org, org_key, org_ledger
from tests.tools.helpers import make_caller, make_tool, sub_state, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def test_billing_selection_org_key_header_and_personal_default(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, members=1)
    member = org.of("member")
    tool = await make_tool(engine, upstream.url("/fast?tokens=5"))
    # the member also has a personal subscription
    from tests.factories import make_subscription

    await make_subscription(engine, member.user_id, "pro")

    personal = await invoke(client, member.headers, tool)
    assert personal.status_code == 200, personal.text
    billed_org = await invoke(client, member.headers, tool, org_id=org.id)
    assert billed_org.status_code == 200, billed_org.text
    key = await org_key(client, org.id, org.of("admin"))
    by_key = await invoke(client, {"Authorization": f"Bearer {key}"}, tool)
    assert by_key.status_code == 200, by_key.text

    ledger = await org_ledger(engine, org.id)
    assert ledger.tokens_used == 10 == ledger.log_tokens == ledger.rollup_tokens
    assert ledger.member_used[member.user_id] == 5
    assert ledger.member_used[org.of("admin").user_id] == 5
    assert (await sub_state(engine, member.user_id)).tokens_used == 5  # the personal call only
    # personal usage shows personal calls only
    summary = (await client.get(f"{API}/usage/summary", headers=member.headers)).json()["data"]
    assert summary["total_invocations"] == 1 and summary["total_tokens"] == 5
    history = (await client.get(f"{API}/usage", headers=member.headers)).json()
    assert history["meta"]["pagination"]["total"] == 1
    # the organization's usage: both members, by member for admins
    org_summary = (await client.get(f"{API}/orgs/{org.id}/usage/summary", headers=org.owner.headers)).json()
    assert org_summary["data"]["total_tokens"] == 10
    assert {m["user_id"]: m["tokens"] for m in org_summary["data"]["by_member"]} == {
        str(member.user_id): 5,
        str(org.of("admin").user_id): 5,
    }
    mine = (await client.get(f"{API}/orgs/{org.id}/usage/summary", headers=member.headers)).json()["data"]
    assert mine["total_tokens"] == 5 and mine["by_member"] is None


async def test_a_non_members_header_is_404_and_bills_nothing(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine)
    outsider = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast?tokens=5"))
    r = await invoke(client, outsider.headers, tool, org_id=org.id)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "NOT_FOUND"
    assert await usage_logs(engine, outsider.user_id) == []
    assert (await org_ledger(engine, org.id)).tokens_used == 0
    assert upstream.total == 0


async def test_member_limit_refuses_with_scope_member(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, members=1, token_limit=12)
    member = org.of("member")
    tool = await make_tool(engine, upstream.url("/fast?tokens=5"))
    codes = [(await invoke(client, member.headers, tool, org_id=org.id)).status_code for _ in range(3)]
    assert codes == [200, 200, 200]  # 0, 5, 10 used before each: under 12
    refused = await invoke(client, member.headers, tool, org_id=org.id)
    assert refused.status_code == 429
    body = refused.json()["error"]
    assert body["code"] == "QUOTA_EXCEEDED" and body["details"][0]["scope"] == "member"
    # another member of the same organization is not limited by it
    assert (await invoke(client, org.of("admin").headers, tool, org_id=org.id)).status_code == 200


async def test_leaving_stops_org_keys_at_once_on_both_instances(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    hubs = [await make_client(own_engine=True), await make_client(own_engine=True)]
    org = await make_org(engine, admins=1, members=0)
    admin = org.of("admin")
    tool = await make_tool(engine, upstream.url("/fast?tokens=1"))
    key = {"Authorization": f"Bearer {await org_key(hubs[0], org.id, admin)}"}
    for hub in hubs:  # each instance has seen (and vouched for) the key
        assert (await invoke(hub, key, tool)).status_code == 200
        assert (await hub.get(f"{API}/orgs/{org.id}", headers=key)).status_code == 200
    left = await hubs[1].delete(f"{API}/orgs/{org.id}/members/{admin.user_id}", headers=admin.headers)
    assert left.status_code == 204, left.text
    for hub in hubs:
        r = await invoke(hub, key, tool)
        assert r.status_code == 401, r.text
        assert (await hub.get(f"{API}/users/me", headers=key)).status_code == 401
    assert (await org_ledger(engine, org.id)).tokens_used == 2


async def test_twenty_members_on_two_instances_share_the_quota_and_keep_their_limits_exactly(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    """20 members call in parallel on two instances: the organization's quota (1,000 tokens
    left) and each member's own limit (60 tokens) hold exactly, and Σ member usage equals the
    organization's tokens_used."""
    hubs = [await make_client(own_engine=True), await make_client(own_engine=True)]
    org = await make_org(engine, admins=0, members=20, plan="pro", tokens_used=49_000, token_limit=60)
    # half the members also get a personal subscription, which must stay untouched
    members = org.members["member"]
    tool = await make_tool(engine, upstream.url("/fast?tokens=1"))
    calls = [
        invoke(hubs[(i + j) % 2], m.headers, tool, org_id=org.id, value={"i": i, "j": j})
        for j in range(80)
        for i, m in enumerate(members)
    ]
    results = await asyncio.gather(*calls)
    codes = {r.status_code for r in results}
    assert codes <= {200, 429}, [r.text for r in results if r.status_code not in (200, 429)][:3]
    ledger = await org_ledger(engine, org.id)
    assert ledger.tokens_reserved == 0 and ledger.inflight == 0 and ledger.member_reserved == 0
    assert ledger.tokens_used - 49_000 == sum(ledger.member_used.values()) == ledger.log_tokens
    assert ledger.log_tokens == ledger.rollup_tokens
    # each member: 1-token calls, 2-token reservations, a limit of 60 → exactly at most 60
    for m in members:
        assert ledger.member_used[m.user_id] <= 60
    assert ledger.tokens_used <= 50_000
    assert sum(r.status_code == 200 for r in results) == ledger.log_tokens
    scopes = {r.json()["error"]["details"][0].get("scope") for r in results if r.status_code == 429}
    assert scopes <= {"member", None}
    # (a call is refused while the tokens held by calls in flight would reach a limit, so the
    # totals may end a little under the limits; never over them)


async def test_personal_usage_unaffected_by_org_calls(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, members=0, admins=0)
    caller = await make_caller(engine, "pro")
    await add_member(engine, org.id, caller.account, "member")
    tool = await make_tool(engine, upstream.url("/fast?tokens=3"))
    for _ in range(3):
        assert (await invoke(client, caller.headers, tool, org_id=org.id)).status_code == 200
    state = await sub_state(engine, caller.user_id)
    assert (state.tokens_used, state.tokens_reserved, state.inflight) == (0, 0, 0)
    summary = (await client.get(f"{API}/usage/summary", headers=caller.headers)).json()["data"]
    assert summary["total_invocations"] == 0
    assert (await client.get(f"{API}/usage/timeseries", headers=caller.headers)).status_code == 200
    other = await make_account(engine)
    assert (await invoke(client, other.headers, tool, org_id=org.id)).status_code == 404


async def test_member_limits_restart_with_the_organizations_period(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    """A member's tokens_used counts the organization's current period: when the period rolls
    over (lazily, at the next call), their limit has room again, and members read 0."""
    org = await make_org(engine, admins=0, members=1, token_limit=10)
    member = org.of("member")
    tool = await make_tool(engine, upstream.url("/fast?tokens=10"))
    assert (await invoke(client, member.headers, tool, org_id=org.id)).status_code == 200
    refused = await invoke(client, member.headers, tool, org_id=org.id)
    assert refused.status_code == 429 and refused.json()["error"]["details"][0]["scope"] == "member"
    async with engine.begin() as conn:  # the period is over (the member counted in it)
        await conn.execute(
            text(
                "UPDATE subscriptions SET current_period_start = now() - interval '30 days',"
                " current_period_end = now() - interval '1 second' WHERE org_id = :o"
            ),
            {"o": org.id},
        )
        await conn.execute(
            text(
                "UPDATE organization_members SET period_end = now() - interval '1 second' WHERE org_id = :o"
            ),
            {"o": org.id},
        )
    members = (await client.get(f"{API}/orgs/{org.id}/members", headers=member.headers)).json()["data"]
    assert {m["user_id"]: m["tokens_used"] for m in members}[str(member.user_id)] == 0
    again = await invoke(client, member.headers, tool, org_id=org.id)
    assert again.status_code == 200, again.text
    ledger = await org_ledger(engine, org.id)
    assert ledger.tokens_used == 10 == ledger.member_used[member.user_id]


async def test_an_org_key_bills_its_own_org_whatever_the_header_says(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, admins=1, members=0)
    other = await make_org(engine, admins=0, members=0)
    tool = await make_tool(engine, upstream.url("/fast?tokens=4"))
    key = {"Authorization": f"Bearer {await org_key(client, org.id, org.of('admin'))}"}
    assert (await invoke(client, key, tool, org_id=other.id)).status_code == 200
    assert (await org_ledger(engine, org.id)).tokens_used == 4
    assert (await org_ledger(engine, other.id)).tokens_used == 0
    # an organization without a subscription: its members' calls need one
    bare = await make_org(engine, admins=0, members=1, plan=None)
    r = await invoke(client, bare.of("member").headers, tool, org_id=bare.id)
    assert (r.status_code, r.json()["error"]["code"]) == (402, "SUBSCRIPTION_REQUIRED")

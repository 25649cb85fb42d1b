"""An organization's usage summary at parity with the personal one (API.md §13 "as §6"): the
refusals of §4.1 per day, counted in the organization's rollup and never in the member's."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.factories import make_subscription
from tests.orgs.helpers import API, invoke, make_org
from tests.tools.helpers import make_tool, run_sql
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def _refusals(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as conn:
        n = (await conn.execute(text(f"SELECT COALESCE(SUM(rate_limited), 0) FROM {table}"))).scalar_one()  # noqa: S608
    return int(n)


async def test_org_refusals_show_in_the_org_summary_per_day_and_not_in_the_personal_one(
    client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    org = await make_org(engine, admins=1, members=1)  # on pro
    member, admin = org.of("member"), org.of("admin")
    await make_subscription(engine, member.user_id, "free")  # the member's own account, unlimited here
    await run_sql(engine, "UPDATE plans SET requests_per_minute = 2 WHERE code = 'pro'")
    tool = await make_tool(engine, upstream.url("/fast?tokens=5"))
    clock.freeze()  # the calls arrive within one emission interval, however slow this machine is

    codes = [(await invoke(client, member.headers, tool, org_id=org.id)).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    # the organization's plan limit is shared: the admin's call is refused too, their only one
    assert (await invoke(client, admin.headers, tool, org_id=org.id)).status_code == 429
    assert (await invoke(client, member.headers, tool)).status_code == 200  # personal: its own limits

    today = utcnow().date().isoformat()
    for query in ("", f"?start_date={today}&end_date={today}"):  # the raw edges, then whole days
        data = (
            await client.get(f"{API}/orgs/{org.id}/usage/summary{query}", headers=org.owner.headers)
        ).json()["data"]
        assert data["rate_limited"] == [{"date": today, "refusals": 3}], query
        assert data["total_invocations"] == 2 and data["total_tokens"] == 10  # refusals are not calls
        # a member or tool with refusals only is not listed: the refusals are no invocations
        assert [m["user_id"] for m in data["by_member"]] == [str(member.user_id)]
        (by_tool,) = data["by_tool"]
        assert (by_tool["invocations"], by_tool["tokens"]) == (2, 10)
        assert (by_tool["input_tokens"], by_tool["output_tokens"]) == (0, 0)  # none reported

    mine = (await client.get(f"{API}/orgs/{org.id}/usage/summary", headers=member.headers)).json()["data"]
    assert mine["rate_limited"] == [{"date": today, "refusals": 2}]
    theirs = (
        await client.get(
            f"{API}/orgs/{org.id}/usage/summary?user_id={admin.user_id}", headers=org.owner.headers
        )
    ).json()["data"]
    assert theirs["rate_limited"] == [{"date": today, "refusals": 1}]
    assert theirs["total_invocations"] == 0 and theirs["by_tool"] == []

    # the member's personal usage is unchanged: one call, no refusal
    personal = (await client.get(f"{API}/usage/summary", headers=member.headers)).json()["data"]
    assert personal["rate_limited"] == [] and personal["total_invocations"] == 1
    assert await _refusals(engine, "usage_daily") == 0
    assert await _refusals(engine, "usage_org_daily") == 3
    assert await _refusals(engine, "usage_platform_daily") == 3  # the platform counts every call's


async def test_personal_refusals_stay_personal(client: Any, engine: AsyncEngine, upstream: Upstream) -> None:
    org = await make_org(engine, admins=0, members=1)
    member = org.of("member")
    await make_subscription(engine, member.user_id, "free")
    await run_sql(engine, "UPDATE plans SET requests_per_minute = 1 WHERE code = 'free'")
    tool = await make_tool(engine, upstream.url("/fast"))
    clock.freeze()
    codes = [(await invoke(client, member.headers, tool)).status_code for _ in range(3)]
    assert codes == [200, 429, 429]

    today = utcnow().date().isoformat()
    personal = (await client.get(f"{API}/usage/summary", headers=member.headers)).json()["data"]
    assert personal["rate_limited"] == [{"date": today, "refusals": 2}]
    org_summary = (await client.get(f"{API}/orgs/{org.id}/usage/summary", headers=org.owner.headers)).json()[
        "data"
    ]
    assert org_summary["rate_limited"] == [] and org_summary["total_invocations"] == 0
    assert await _refusals(engine, "usage_org_daily") == 0

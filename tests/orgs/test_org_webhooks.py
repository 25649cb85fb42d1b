"""Organization webhooks and quota emails (API.md §11 with §13): the organization's subscription
events go to the endpoints registered under /orgs/{org_id}/webhooks (admin+), and its quota
threshold emails to its owners and admins."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.webhooks import outbox
from tests.orgs.helpers import API, invoke, make_org
from tests.tools.helpers import make_tool
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

EVENTS = ["quota.threshold_reached", "subscription.upgraded"]


async def test_org_endpoints_roles_and_events(client: Any, engine: AsyncEngine, upstream: Upstream) -> None:
    org = await make_org(engine, admins=1, members=1, plan="free", tokens_used=790)  # limit 1,000
    base = f"{API}/orgs/{org.id}/webhooks"
    body = {"url": "http://127.0.0.1:9/hook", "events": EVENTS}
    assert (await client.post(base, json=body, headers=org.of("member").headers)).status_code == 403
    made = await client.post(base, json=body, headers=org.of("admin").headers)
    assert made.status_code == 201, made.text
    endpoint_id = made.json()["data"]["id"]
    # the endpoint is the organization's: not in the admin's own list
    mine = (await client.get(f"{API}/users/me/webhooks", headers=org.of("admin").headers)).json()["data"]
    assert mine == []
    assert [e["id"] for e in (await client.get(base, headers=org.owner.headers)).json()["data"]] == [
        endpoint_id
    ]

    tool = await make_tool(engine, upstream.url("/fast?tokens=20"))
    r = await invoke(client, org.of("member").headers, tool, org_id=org.id)  # 790 → 810: 80 % crossed
    assert r.status_code == 200, r.text
    up = await client.post(
        f"{API}/orgs/{org.id}/subscription", json={"plan": "pro"}, headers=org.owner.headers
    )
    assert up.status_code == 200, up.text
    await outbox.fan_out_all(engine, now=utcnow())
    async with engine.connect() as conn:
        delivered = (
            await conn.execute(
                text(
                    "SELECT ev.type, ev.data FROM webhook_deliveries AS d"
                    " JOIN webhook_events AS ev ON ev.id = d.event_id WHERE d.endpoint_id = :e"
                    " ORDER BY ev.created_at"
                ),
                {"e": endpoint_id},
            )
        ).all()
        emails = (
            await conn.execute(
                text("SELECT recipient FROM notification_emails WHERE kind = 'quota_threshold'")
            )
        ).scalars()
        recipients = set(emails)
    assert [d.type for d in delivered] == EVENTS
    threshold = delivered[0].data
    assert threshold["org_id"] == str(org.id) and threshold["threshold"] == 80 and "user_id" not in threshold
    assert delivered[1].data["org_id"] == str(org.id)
    # quota emails to the owner and the admin, not to the member
    assert recipients == {org.owner.email, org.of("admin").email}

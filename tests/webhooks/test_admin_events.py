"""Platform (admin) endpoints: every user's subscription events, and the tool circuit events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import make_account, make_admin
from tests.subscriptions.helpers import SUBS, auth
from tests.tools.helpers import invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream
from tests.webhooks.helpers import ADMIN, create_endpoint, rows, verify
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration

CIRCUIT = ["tool.circuit_opened", "tool.circuit_closed"]


async def test_a_platform_endpoint_gets_every_users_events(
    client: httpx.AsyncClient, engine: AsyncEngine, receiver: Receiver
) -> None:
    admin = await make_admin(engine)
    _, secret = await create_endpoint(
        client, auth(admin), receiver.url(), ["subscription.created"], base=ADMIN
    )
    users = [await make_account(engine) for _ in range(3)]
    for user in users:
        assert (await client.post(SUBS, json={"plan": "free"}, headers=auth(user))).status_code == 201
    got = [verify(r, secret) for r in await receiver.wait_for(3)]
    assert sorted(e["data"]["user_id"] for e in got) == sorted(str(u.user_id) for u in users)


async def test_circuit_events_reach_admin_endpoints_only(
    make_client: Callable[..., Any],
    engine: AsyncEngine,
    upstream: Upstream,
    receiver: Receiver,
) -> None:
    # a tiny recovery time: the call after the circuit opens is already the half-open trial
    client = await make_client(circuit_failure_threshold=3, circuit_recovery_seconds=0.001)
    admin = await make_admin(engine)
    _, secret = await create_endpoint(client, auth(admin), receiver.url("/platform"), CIRCUIT, base=ADMIN)
    caller = await make_caller(engine, "pro")
    r = await client.post(
        "/api/v1/users/me/webhooks", json={"url": receiver.url(), "events": CIRCUIT}, headers=caller.headers
    )
    assert r.status_code == 422  # not for users' endpoints

    # fails 3 times (threshold: the circuit opens), then answers: the trial closes it
    tool = await make_tool(engine, upstream.url("/flap?key=c&fail=3"), max_attempts=1, name="flaky-tool")
    for _ in range(3):
        assert (await invoke(client, caller, tool)).status_code == 503
    assert (await invoke(client, caller, tool)).status_code == 200
    got = sorted(
        (verify(r, secret) for r in await receiver.wait_for(2, path="/platform")), key=lambda e: e["type"]
    )
    assert [e["type"] for e in got] == ["tool.circuit_closed", "tool.circuit_opened"]
    for event in got:
        assert event["data"] == {"tool_id": str(tool), "tool_name": "flaky-tool", "consecutive_failures": 3}

    # an admin's reset of an open circuit: the event is written with the reset
    broken = await make_tool(engine, upstream.url("/status?code=500"), max_attempts=1, name="broken-tool")
    for _ in range(3):
        assert (await invoke(client, caller, broken)).status_code == 503
    [*_, opened] = await receiver.wait_for(3, path="/platform")
    assert opened.event["data"]["tool_name"] == "broken-tool"
    r = await client.post(f"/api/v1/admin/tools/{broken}/circuit/reset", headers=auth(admin))
    assert r.status_code == 200
    [*_, closed] = await receiver.wait_for(4, path="/platform")
    assert closed.event["type"] == "tool.circuit_closed"
    assert closed.event["data"] == {
        "tool_id": str(broken),
        "tool_name": "broken-tool",
        "consecutive_failures": 3,
    }
    # a reset of a closed circuit is no event
    assert (
        await client.post(f"/api/v1/admin/tools/{broken}/circuit/reset", headers=auth(admin))
    ).status_code == 200
    events = await rows(engine, "SELECT type FROM webhook_events WHERE type LIKE 'tool.%'")
    assert len(events) == 4
    assert receiver.at("/ok") == []

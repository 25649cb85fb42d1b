"""Quota thresholds (API.md §11): decided in the settle statement, exactly once per threshold
per period however many workers settle at once, as a signed webhook and an email."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.auth.support import SmtpServer
from tests.subscriptions.helpers import auth, set_plan, set_sub
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream
from tests.webhooks.helpers import API, all_recorded, create_endpoint, eventually, rows, scalar, verify
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration

NOTIFICATIONS = f"{API}/users/me/notifications"


def _smtp_settings(smtp: SmtpServer) -> dict[str, Any]:
    return {"email_backend": "smtp", "smtp_host": "127.0.0.1", "smtp_port": smtp.port}


async def _emails_settled(engine: AsyncEngine, *apps: Any) -> None:
    async def done() -> bool:
        pending = await rows(
            engine,
            "SELECT 1 FROM webhook_events WHERE fanned_out_at IS NULL"
            " UNION ALL SELECT 1 FROM notification_emails WHERE status = 'pending'",
        )
        return not pending

    await eventually(done, *apps)


async def test_parallel_settles_on_two_instances_fire_the_threshold_once(
    make_client: Callable[..., Any],
    engine: AsyncEngine,
    upstream: Upstream,
    receiver: Receiver,
    smtp: SmtpServer,
) -> None:
    a: httpx.AsyncClient = await make_client(own_engine=True, **_smtp_settings(smtp))
    b: httpx.AsyncClient = await make_client(own_engine=True, **_smtp_settings(smtp))
    # pro: 50,000 tokens; 39,900 used; 100 calls of 2 tokens cross 80 % (40,000) once, 100 % never
    caller = await make_caller(engine, "pro", tokens_used=39_900)
    _, secret = await create_endpoint(a, caller.headers, receiver.url(), ["quota.threshold_reached"])
    tool = await make_tool(engine, upstream.url("/fast?tokens=2"))

    responses = await asyncio.gather(*(invoke((a, b)[i % 2], caller, tool, {"i": i}) for i in range(100)))
    assert [r.status_code for r in responses] == [200] * 100
    await assert_settled(engine, caller, baseline=39_900)

    [delivery] = await receiver.wait_for(1)
    event = verify(delivery, secret)
    assert event["type"] == "quota.threshold_reached"
    data = event["data"]
    sub = (await a.get(f"{API}/subscriptions/current", headers=caller.headers)).json()["data"]
    assert data == {
        "subscription_id": str(caller.subscription_id),
        "user_id": str(caller.user_id),
        "threshold": 80,
        "token_limit": 50_000,
        "tokens_used": data["tokens_used"],
        "period_end": sub["current_period_end"],
    }
    # the settle that crossed it — a group-committed batch of calls, up to 64 of 2 tokens each
    assert 40_000 <= data["tokens_used"] <= 40_000 + 2 * 64

    # an email is marked sent once the SMTP server accepted it: then it is in the inbox
    await _emails_settled(engine, a.app, b.app)  # type: ignore[attr-defined]
    await all_recorded(engine, a.app, b.app)  # type: ignore[attr-defined]
    assert len(smtp.messages) == 1
    assert len(receiver.received) == 1
    assert await scalar(engine, "SELECT count(*) FROM webhook_events") == 1
    assert await scalar(engine, "SELECT count(*) FROM quota_alerts") == 1
    [mail] = smtp.messages
    assert mail["To"] == caller.account.email
    assert "80%" in mail["Subject"]
    body = smtp.bodies()[0]
    assert "80% of its token quota" in body and "50,000 tokens" in body and "resets on" in body


async def test_thresholds_follow_the_preferences(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, upstream: Upstream, receiver: Receiver
) -> None:
    """Custom thresholds fire (several in one settle when it crosses several); the 100 % one
    too; with quota_email off only the webhook goes; an empty list turns alerts off."""
    caller = await make_caller(engine, "free", tokens_used=0)  # 1,000 tokens
    r = await client.patch(
        NOTIFICATIONS, json={"thresholds": [100, 25, 50, 25], "quota_email": False}, headers=caller.headers
    )
    assert r.status_code == 200 and r.json()["data"] == {"quota_email": False, "thresholds": [25, 50, 100]}
    _, secret = await create_endpoint(client, caller.headers, receiver.url())
    tool = await make_tool(engine, upstream.url("/tokens_used?n=300"))

    assert (await invoke(client, caller, tool)).status_code == 200  # 300: crosses 25
    assert (await invoke(client, caller, tool)).status_code == 200  # 600: crosses 50
    assert (await invoke(client, caller, tool)).status_code == 200  # 900: nothing
    assert (await invoke(client, caller, tool)).status_code == 200  # 1,200: crosses 100
    got = sorted(
        (verify(d, secret)["data"] for d in await receiver.wait_for(3)), key=lambda d: d["threshold"]
    )
    assert [(d["threshold"], d["tokens_used"]) for d in got] == [(25, 300), (50, 600), (100, 1200)]
    await _emails_settled(engine, app)
    assert await scalar(engine, "SELECT count(*) FROM notification_emails") == 0

    # one settle crossing two thresholds fires both
    other = await make_caller(engine, "free", tokens_used=0)
    await create_endpoint(client, other.headers, receiver.url("/other"), ["quota.threshold_reached"])
    big = await make_tool(engine, upstream.url("/tokens_used?n=1000"))
    assert (await invoke(client, other, big)).status_code == 200
    both = await receiver.wait_for(2, path="/other")
    assert sorted(d.event["data"]["threshold"] for d in both) == [80, 100]

    # no thresholds: no alerts at all
    quiet = await make_caller(engine, "free", tokens_used=0)
    r = await client.patch(NOTIFICATIONS, json={"thresholds": []}, headers=quiet.headers)
    assert r.json()["data"] == {"quota_email": True, "thresholds": []}
    assert (await invoke(client, quiet, big)).status_code == 200
    assert (
        await scalar(
            engine, "SELECT count(*) FROM quota_alerts WHERE subscription_id = :s", s=quiet.subscription_id
        )
        == 0
    )


async def test_a_threshold_fires_once_per_period_even_if_the_limit_changes(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, upstream: Upstream, receiver: Receiver
) -> None:
    caller = await make_caller(engine, "free", tokens_used=700)
    await create_endpoint(client, caller.headers, receiver.url(), ["quota.threshold_reached"])
    tool = await make_tool(engine, upstream.url("/tokens_used?n=150"))
    assert (await invoke(client, caller, tool)).status_code == 200  # 850 of 1,000: 80 % fired
    await receiver.wait_for(1)

    await set_plan(engine, "free", token_limit=2_000)  # 42.5 % now
    assert (await invoke(client, caller, tool)).status_code == 200  # 1,000
    await set_plan(engine, "free", token_limit=1_100)  # 90.9 %: 80 % "crossed" again, not re-fired
    await set_sub(engine, caller.user_id, tokens_used=700)
    assert (await invoke(client, caller, tool)).status_code == 200  # 700 → 850 of 1,100 (77 %)
    assert (await invoke(client, caller, tool)).status_code == 200  # 1,000 of 1,100: 80 % again
    assert await scalar(engine, "SELECT count(*) FROM webhook_events") == 1

    # a new period: the thresholds fire again
    await all_recorded(engine, app)
    clock.advance(timedelta(days=31))
    assert (await client.get(f"{API}/subscriptions/current", headers=auth(caller.account))).status_code == 200
    await set_plan(engine, "free", token_limit=1_000)
    await set_sub(engine, caller.user_id, tokens_used=700)
    assert (await invoke(client, caller, tool, headers=auth(caller.account))).status_code == 200
    [_, second] = await receiver.wait_for(2)
    assert second.event["data"]["threshold"] == 80
    assert second.event["data"]["period_end"] != receiver.received[0].event["data"]["period_end"]


async def test_notification_preferences_validation(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    caller = await make_caller(engine, None)
    r = await client.get(NOTIFICATIONS, headers=caller.headers)
    assert r.status_code == 200 and r.json()["data"] == {"quota_email": True, "thresholds": [80, 100]}
    for body, field in [
        ({"thresholds": [0]}, "body.thresholds.0"),
        ({"thresholds": [101]}, "body.thresholds.0"),
        ({"thresholds": ["80"]}, "body.thresholds.0"),
        ({"thresholds": [80.5]}, "body.thresholds.0"),
        ({"thresholds": list(range(1, 12))}, "body.thresholds"),
        ({"thresholds": None}, "body.thresholds"),
        ({"quota_email": "yes"}, "body.quota_email"),
        ({"quota_email": 1}, "body.quota_email"),
        ({"quota_email": None}, "body.quota_email"),
        ({"threshold": [80]}, "body.threshold"),
    ]:
        r = await client.patch(NOTIFICATIONS, json=body, headers=caller.headers)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"
        assert field in [d["field"] for d in r.json()["error"]["details"]], (body, r.json())
    r = await client.patch(
        NOTIFICATIONS, content=b"[1", headers={**caller.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert (await client.get(NOTIFICATIONS)).status_code == 401
    # nothing changed; concurrent PATCHes of different fields both stand
    await asyncio.gather(
        client.patch(NOTIFICATIONS, json={"quota_email": False}, headers=caller.headers),
        client.patch(NOTIFICATIONS, json={"thresholds": [90]}, headers=caller.headers),
    )
    r = await client.get(NOTIFICATIONS, headers=caller.headers)
    assert r.json()["data"] == {"quota_email": False, "thresholds": [90]}

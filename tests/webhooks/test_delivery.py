"""Delivery (API.md §11) against a real loopback receiver: retries with the same webhook-id,
redirects not followed, disabling after the failure window (clock injected) with an email,
deleting an endpoint, manual retries, rotation, and invocations never waiting on deliveries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import WebhookVerificationError

from joyhub.core.clock import clock, utcnow
from joyhub.webhooks import outbox
from tests.auth.support import SmtpServer
from tests.factories import make_account
from tests.subscriptions.helpers import SUBS, auth
from tests.tools.helpers import invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream
from tests.webhooks.helpers import (
    ME,
    all_recorded,
    create_endpoint,
    delivery_states,
    eventually,
    is_recorded,
    rows,
    scalar,
    verify,
)
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration


async def _recorded(engine: AsyncEngine, app: Any, endpoint_id: str, attempts: int) -> Any:
    """The endpoint's one delivery, once its attempt number `attempts` is recorded."""

    async def done() -> bool:
        states = await delivery_states(engine, endpoint_id)
        return bool(states) and states[0].attempts >= attempts and is_recorded(states[0])

    await eventually(done, app)
    [state] = await delivery_states(engine, endpoint_id)
    return state


async def _retry_now(app: Any) -> None:
    """Move time past the first retry delay (5 s, ±10 %) and wake the dispatcher."""
    clock.advance(timedelta(seconds=6))
    app.state.webhooks.wake()


async def test_a_receiver_down_then_up_gets_the_event_after_retries_with_one_webhook_id(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    user = await make_account(engine)
    url = receiver.script("flaky", [500])
    endpoint_id, secret = await create_endpoint(client, auth(user), url, ["subscription.created"])
    await receiver.stop()  # down: connections refused

    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    state = await _recorded(engine, app, endpoint_id, 1)
    assert (state.status, state.attempts, state.last_status_code) == ("pending", 1, None)
    assert state.last_error.startswith("connection failed")
    assert timedelta(seconds=4) <= state.next_attempt_at - utcnow() <= timedelta(seconds=6)

    await receiver.start()  # up again, on the same port: answers 500 once, then 200
    await _retry_now(app)
    state = await _recorded(engine, app, endpoint_id, 2)
    assert (state.status, state.last_status_code, state.last_error) == ("pending", 500, "HTTP 500")
    assert timedelta(minutes=4) <= state.next_attempt_at - utcnow() <= timedelta(minutes=6)

    clock.advance(timedelta(minutes=6))
    app.state.webhooks.wake()
    first, second = await receiver.wait_for(2)
    state = await _recorded(engine, app, endpoint_id, 3)
    assert (state.status, state.attempts, state.last_status_code, state.next_attempt_at) == (
        "succeeded",
        3,
        200,
        None,
    )
    assert first.webhook_id == second.webhook_id == verify(second, secret)["id"]
    assert first.body == second.body
    assert verify(first, secret) == verify(second, secret)


async def test_a_redirect_is_a_failure_and_is_not_followed(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url("/redirect"))
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    state = await _recorded(engine, app, endpoint_id, 1)
    assert (state.status, state.last_status_code) == ("pending", 302)
    assert "redirect" in state.last_error
    assert receiver.at("/ok") == []
    r = await client.get(f"{ME}/{endpoint_id}/deliveries", headers=auth(user))
    [listed] = r.json()["data"]
    assert (listed["status"], listed["last_status_code"], listed["attempts"]) == ("pending", 302, 1)
    assert listed["event_type"] == "subscription.created" and listed["event_id"].startswith("evt_")


async def test_the_schedule_runs_out_into_failed(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url("/status/503"))
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    delays = [timedelta(seconds=6), *(timedelta(hours=h) for h in (0.1, 0.6, 2.3, 5.6, 11.1, 11.1))]
    for attempt, delay in enumerate(delays, start=1):
        state = await _recorded(engine, app, endpoint_id, attempt)
        assert (state.status, state.attempts) == ("pending", attempt)
        clock.advance(delay)
        app.state.webhooks.wake()
    state = await _recorded(engine, app, endpoint_id, 8)
    assert (state.status, state.attempts, state.next_attempt_at) == ("failed", 8, None)
    assert len(await receiver.wait_for(8)) == 8


async def test_an_endpoint_failing_for_five_days_is_disabled_and_its_owner_emailed(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver, smtp: SmtpServer
) -> None:
    client = await make_client(email_backend="smtp", smtp_host="127.0.0.1", smtp_port=smtp.port)
    app = client.app  # type: ignore[attr-defined]
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url("/status/500"))
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    assert (await client.post(f"{SUBS}/cancel", headers=auth(user))).status_code == 200
    await eventually(lambda: _all_attempted(engine, endpoint_id, 2), app)
    failing_since = await scalar(engine, "SELECT failing_since FROM webhook_endpoints")
    assert failing_since is not None

    clock.advance(timedelta(days=4, hours=23))  # not yet
    await _retry_now(app)
    await eventually(lambda: _all_attempted(engine, endpoint_id, 4), app)
    assert await scalar(engine, "SELECT is_active FROM webhook_endpoints") is True

    clock.advance(timedelta(hours=2))  # five days of failures
    await _retry_now(app)

    async def disabled() -> bool:
        return await scalar(engine, "SELECT is_active FROM webhook_endpoints") is False

    await eventually(disabled, app)
    [endpoint] = (await client.get(ME, headers=auth(user))).json()["data"]
    assert endpoint["is_active"] is False
    assert endpoint["disabled_reason"] == "every delivery failed for 5 days"
    states = await delivery_states(engine, endpoint_id)
    assert [s.status for s in states] == ["failed", "failed"]

    async def mailed() -> bool:
        return await scalar(engine, "SELECT count(*) FROM notification_emails WHERE status = 'sent'") == 1

    await eventually(mailed, app)
    [mail] = smtp.messages
    assert mail["To"] == user.email and "disabled" in mail["Subject"]
    assert receiver.url("/status/500") in smtp.bodies()[0]

    # enabling it again clears the reason; a failed delivery can be retried by hand
    r = await client.patch(f"{ME}/{endpoint_id}", json={"is_active": True}, headers=auth(user))
    assert r.status_code == 200 and r.json()["data"]["disabled_reason"] is None
    r = await client.patch(f"{ME}/{endpoint_id}", json={"url": receiver.url()}, headers=auth(user))
    assert r.status_code == 200
    # (both deliveries may share their created_at: the one to retry is picked by its event)
    created = next(s for s in states if s.type == "subscription.created")
    r = await client.post(f"{ME}/{endpoint_id}/deliveries/{created.id}/retry", headers=auth(user))
    assert r.status_code == 202 and r.json()["data"]["status"] == "pending"
    [ok] = await receiver.wait_for(1, path="/ok")
    assert ok.event["type"] == "subscription.created"


async def _all_attempted(engine: AsyncEngine, endpoint_id: str, attempts: int) -> bool:
    """The endpoint's deliveries have had `attempts` attempts in all, every one recorded."""
    states = await delivery_states(engine, endpoint_id)
    return sum(s.attempts for s in states) >= attempts and all(is_recorded(s) for s in states)


async def test_deleting_an_endpoint_stops_its_pending_deliveries(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    client = await make_client(webhook_dispatch_in_serve=False)
    app = client.app  # type: ignore[attr-defined]
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url())
    kept_id, _ = await create_endpoint(client, auth(user), receiver.url("/kept"))
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    assert (await client.post(f"{SUBS}/cancel", headers=auth(user))).status_code == 200
    await outbox.fan_out_all(engine, now=utcnow())
    assert len(await delivery_states(engine, endpoint_id)) == 2

    assert (await client.delete(f"{ME}/{endpoint_id}", headers=auth(user))).status_code == 204
    assert await delivery_states(engine, endpoint_id) == []
    assert await app.state.webhooks.deliver_due() == 2  # the other endpoint's two, nothing else
    assert receiver.at("/ok") == [] and len(receiver.at("/kept")) == 2
    assert (await client.get(f"{ME}/{endpoint_id}/deliveries", headers=auth(user))).status_code == 404
    assert len(await delivery_states(engine, kept_id)) == 2


async def test_disabling_an_endpoint_fails_its_pending_deliveries(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    client = await make_client(webhook_dispatch_in_serve=False)
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url())
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    await outbox.fan_out_all(engine, now=utcnow())
    r = await client.patch(f"{ME}/{endpoint_id}", json={"is_active": False}, headers=auth(user))
    assert r.status_code == 200 and r.json()["data"]["is_active"] is False
    [state] = await delivery_states(engine, endpoint_id)
    assert (state.status, state.last_error) == ("failed", "endpoint disabled")
    assert await client.app.state.webhooks.deliver_due() == 0  # type: ignore[attr-defined]
    r = await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
    r = await client.post(f"{ME}/{endpoint_id}/deliveries/{state.id}/retry", headers=auth(user))
    assert r.status_code == 409


async def test_test_event_and_rotation_with_both_signatures_for_24_hours(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    user = await make_account(engine)
    endpoint_id, old = await create_endpoint(client, auth(user), receiver.url())
    r = await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))
    assert r.status_code == 202
    delivery = r.json()["data"]
    assert (delivery["event_type"], delivery["status"], delivery["attempts"]) == (
        "webhook.test",
        "pending",
        0,
    )
    [first] = await receiver.wait_for(1)
    event = verify(first, old)
    assert (event["type"], event["data"], event["id"]) == ("webhook.test", {}, delivery["event_id"])
    assert first.headers["content-type"] == "application/json"
    assert first.headers["user-agent"].startswith("JoyfullUIHub-Webhooks/")

    r = await client.post(f"{ME}/{endpoint_id}/rotate-secret", headers=auth(user))
    assert r.status_code == 200
    new = r.json()["data"]["secret"]
    assert new.startswith("whsec_") and new != old
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    [_, second] = await receiver.wait_for(2)
    verify(second, old, new)  # either secret verifies during the overlap
    assert len(second.headers["webhook-signature"].split(" ")) == 2

    await all_recorded(engine, app)
    clock.advance(timedelta(hours=24, minutes=1))
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    [*_, third] = await receiver.wait_for(3)
    verify(third, new)
    with pytest.raises(WebhookVerificationError):
        verify(third, old)

    listed = (await client.get(f"{ME}/{endpoint_id}/deliveries", headers=auth(user))).json()
    await all_recorded(engine, app)
    listed = (await client.get(f"{ME}/{endpoint_id}/deliveries?status=succeeded", headers=auth(user))).json()
    assert listed["meta"]["pagination"]["total"] == 3
    assert [d["event_type"] for d in listed["data"]] == ["webhook.test"] * 3
    assert listed["data"][0]["created_at"] >= listed["data"][-1]["created_at"]  # newest first


async def test_a_black_hole_receiver_does_not_slow_invocations(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream, receiver: Receiver
) -> None:
    """Every dispatcher slot stuck on a receiver that never answers: invocations (which also
    fire quota events) all complete while those attempts are still hanging."""
    client = await make_client(webhook_concurrency=4)
    caller = await make_caller(engine, "free", tokens_used=700)
    endpoint_id, _ = await create_endpoint(client, caller.headers, receiver.url("/blackhole"))
    for _ in range(6):
        assert (await client.post(f"{ME}/{endpoint_id}/test", headers=caller.headers)).status_code == 202
    await receiver.wait_hanging(4)

    tool = await make_tool(engine, upstream.url("/fast?tokens=10"))
    responses = await asyncio.gather(*(invoke(client, caller, tool, {"i": i}) for i in range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    # the quota event those calls fired (80 %) is in the outbox, its delivery behind the black hole
    assert (
        await scalar(engine, "SELECT count(*) FROM webhook_events WHERE type = 'quota.threshold_reached'")
        == 1
    )
    assert receiver.hanging == 4  # all four slots still stuck: nobody waited for them
    states = await delivery_states(engine, endpoint_id)
    assert all(s.last_error is None and s.last_status_code is None for s in states)  # none finished
    await receiver.stop()  # let them go


async def test_deliveries_are_kept_30_days(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    from joyhub.ops import sweeper

    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url())
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    await receiver.wait_for(1)
    await all_recorded(engine, app)
    clock.advance(timedelta(days=29))
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    await receiver.wait_for(2)
    await all_recorded(engine, app)
    clock.advance(timedelta(days=2))
    results = await sweeper.sweep_once(app.state.sessionmaker, app.state.settings)
    assert results["webhook_events_retention"] == 1
    assert len(await delivery_states(engine, endpoint_id)) == 1
    assert (
        await rows(
            engine, "SELECT 1 FROM webhook_events WHERE created_at < :c", c=utcnow() - timedelta(days=30)
        )
        == []
    )


async def test_unknown_endpoint_and_delivery_ids(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    missing = uuid.uuid4()
    for method, path in [
        ("PATCH", f"{ME}/{missing}"),
        ("DELETE", f"{ME}/{missing}"),
        ("POST", f"{ME}/{missing}/rotate-secret"),
        ("POST", f"{ME}/{missing}/test"),
        ("GET", f"{ME}/{missing}/deliveries"),
        ("POST", f"{ME}/{missing}/deliveries/{missing}/retry"),
    ]:
        r = await client.request(method, path, headers=auth(user), json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, path, r.text)

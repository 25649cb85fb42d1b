"""The dispatcher: woken by NOTIFY (not by polling), shared by instances without double
deliveries, surviving a lost LISTEN connection, run on its own (`joyhub deliver`), measured."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.webhooks.runtime import run_standalone
from tests.conftest import test_settings as hub_settings
from tests.factories import make_account
from tests.subscriptions.helpers import SUBS, auth
from tests.webhooks.helpers import (
    ME,
    all_recorded,
    create_endpoint,
    eventually,
    execute,
    is_recorded,
    rows,
    verify,
)
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration

NO_POLL = 3600.0  # the safety-net poll never fires during these tests: only NOTIFY wakes


async def test_an_event_committed_on_one_instance_wakes_the_dispatcher_of_another(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    writer = await make_client(own_engine=True, webhook_dispatch_in_serve=False)
    deliverer = await make_client(own_engine=True, webhook_poll_seconds=NO_POLL)
    dispatcher = deliverer.app.state.webhooks  # type: ignore[attr-defined]
    await asyncio.wait_for(dispatcher.listening.wait(), 20)
    user = await make_account(engine)
    _, secret = await create_endpoint(writer, auth(user), receiver.url(), ["subscription.created"])
    assert (await writer.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    [got] = await receiver.wait_for(1)
    assert verify(got, secret)["type"] == "subscription.created"


async def test_the_dispatcher_listens_again_after_losing_its_connection(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    client = await make_client(webhook_poll_seconds=NO_POLL)
    dispatcher = client.app.state.webhooks  # type: ignore[attr-defined]
    await asyncio.wait_for(dispatcher.listening.wait(), 20)
    await execute(
        engine,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'joyhub-webhooks' AND datname = current_database()",
    )
    user = await make_account(engine)
    await create_endpoint(client, auth(user), receiver.url(), ["subscription.created"])
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    [got] = await receiver.wait_for(1)  # whether it heard the NOTIFY or re-read on reconnecting
    assert got.event["type"] == "subscription.created"
    await asyncio.wait_for(dispatcher.listening.wait(), 20)


async def test_two_instances_never_deliver_one_delivery_twice(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    a = await make_client(own_engine=True, webhook_concurrency=8)
    b = await make_client(own_engine=True, webhook_concurrency=8)
    user = await make_account(engine)
    endpoint_id, secret = await create_endpoint(a, auth(user), receiver.url())
    responses = await asyncio.gather(
        *((a, b)[i % 2].post(f"{ME}/{endpoint_id}/test", headers=auth(user)) for i in range(60))
    )
    assert {r.status_code for r in responses} == {202}
    got = await receiver.wait_for(60)
    await all_recorded(engine, a.app, b.app)  # type: ignore[attr-defined]
    assert len(receiver.received) == 60
    assert len({verify(r, secret)["id"] for r in got}) == 60


async def test_joyhub_deliver_once(
    make_client: Callable[..., Any], engine: AsyncEngine, receiver: Receiver
) -> None:
    client = await make_client(webhook_dispatch_in_serve=False)
    user = await make_account(engine)
    endpoint_id, secret = await create_endpoint(client, auth(user), receiver.url())
    assert (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).status_code == 201
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    url = engine.url.render_as_string(hide_password=False)
    assert await run_standalone(url, hub_settings(), once=True) == 0
    got = await receiver.wait_for(2)
    assert sorted(verify(r, secret)["type"] for r in got) == ["subscription.created", "webhook.test"]


async def test_metrics(client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver) -> None:
    user = await make_account(engine)
    endpoint_id, _ = await create_endpoint(client, auth(user), receiver.url("/status/500"))
    assert (await client.post(f"{ME}/{endpoint_id}/test", headers=auth(user))).status_code == 202
    await receiver.wait_for(1)
    await all_recorded_or_retrying(engine, app)
    await app.state.webhooks.refresh_gauges()
    text = (await client.get("/metrics")).text
    assert 'joyhub_webhook_attempts_total{outcome="http_5xx"}' in text
    assert "joyhub_webhook_queue_depth 1.0" in text
    assert "joyhub_webhook_oldest_pending_seconds" in text


async def all_recorded_or_retrying(engine: AsyncEngine, app: Any) -> None:
    async def done() -> bool:
        states = await rows(
            engine, "SELECT status, attempts, next_attempt_at, updated_at FROM webhook_deliveries"
        )
        return bool(states) and all(is_recorded(s) for s in states)

    await eventually(done, app)

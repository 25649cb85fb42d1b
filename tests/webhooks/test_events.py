"""Every subscription event of API.md §11 fires once, with the documented data, through a real
receiver, each delivery verified by `standardwebhooks` with the endpoint's secret."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.factories import make_account, make_admin
from tests.subscriptions.helpers import SUBS, auth, grant_url
from tests.webhooks.helpers import all_recorded, create_endpoint, eventually, rows, verify
from tests.webhooks.receiver import Receiver

pytestmark = pytest.mark.integration


class Inbox:
    """The endpoint's deliveries, taken in order and checked one by one."""

    def __init__(self, receiver: Receiver, secret: str) -> None:
        self.receiver = receiver
        self.secret = secret
        self.seen = 0

    async def next(self, count: int = 1) -> list[dict[str, Any]]:
        got = await self.receiver.wait_for(self.seen + count)
        fresh = got[self.seen : self.seen + count]
        self.seen += count
        return sorted((verify(r, self.secret) for r in fresh), key=lambda e: str(e["type"]))

    async def one(self, event_type: str, subscription: dict[str, Any], user_id: str) -> dict[str, Any]:
        [event] = await self.next()
        assert event["type"] == event_type
        assert event["id"].startswith("evt_")
        assert event["data"] == {"subscription": subscription, "user_id": user_id}
        return event


async def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code in (200, 201), response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_every_subscription_event_fires_once_with_its_data(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    user = await make_account(engine)
    uid = str(user.user_id)
    _, secret = await create_endpoint(client, auth(user), receiver.url())
    inbox = Inbox(receiver, secret)

    sub = await _ok(await client.post(SUBS, json={"plan": "free"}, headers=auth(user)))
    await inbox.one("subscription.created", sub, uid)
    sub = await _ok(await client.post(SUBS, json={"plan": "pro"}, headers=auth(user)))
    await inbox.one("subscription.upgraded", sub, uid)
    sub = await _ok(await client.post(SUBS, json={"plan": "free"}, headers=auth(user)))
    assert sub["scheduled_plan"] == "free"
    await inbox.one("subscription.downgrade_scheduled", sub, uid)
    sub = await _ok(await client.post(SUBS, json={"plan": "pro"}, headers=auth(user)))
    assert sub["scheduled_plan"] is None
    await inbox.one("subscription.resumed", sub, uid)  # re-picking the plan clears the downgrade
    sub = await _ok(await client.post(f"{SUBS}/cancel", headers=auth(user)))
    await inbox.one("subscription.cancelled", sub, uid)
    sub = await _ok(await client.post(f"{SUBS}/resume", headers=auth(user)))
    await inbox.one("subscription.resumed", sub, uid)

    # nothing changes, nothing fires: cancel/resume twice, re-pick with nothing pending
    await _ok(await client.post(f"{SUBS}/resume", headers=auth(user)))
    await _ok(await client.post(SUBS, json={"plan": "pro"}, headers=auth(user)))

    # time: a renewal resets the quota
    await _set_tokens(engine, user.user_id, 1234)
    await all_recorded(engine, app)  # before time jumps: no lease of an attempt in flight expires
    clock.advance(timedelta(days=30, minutes=1))
    sub = await _ok(await client.get(f"{SUBS}/current", headers=auth(user)))
    reset, renewed = await inbox.next(2)
    assert renewed["type"] == "subscription.renewed" and renewed["data"]["subscription"] == sub
    assert reset["type"] == "quota.period_reset"
    assert reset["data"] == {
        "subscription_id": sub["id"],
        "user_id": uid,
        "previous_tokens_used": 1234,
        "period_start": sub["current_period_start"],
        "period_end": sub["current_period_end"],
    }

    # a cancelled subscription reaching its end
    await _ok(await client.post(f"{SUBS}/cancel", headers=auth(user)))
    await inbox.next()
    await all_recorded(engine, app)
    clock.advance(timedelta(days=31))
    sub = await _ok(await client.get(f"{SUBS}/current", headers=auth(user)))
    assert sub["status"] == "cancelled"
    await inbox.one("subscription.ended", sub, uid)

    # an admin grant until tomorrow, then its expiry
    admin = await make_admin(engine)
    until = (utcnow() + timedelta(days=1)).isoformat()
    r = await client.put(
        grant_url(user.user_id), json={"plan": "pro", "expires_at": until}, headers=auth(admin)
    )
    sub = await _ok(r)
    await inbox.one("subscription.created", sub, uid)
    await all_recorded(engine, app)
    clock.advance(timedelta(days=2))
    sub = await _ok(await client.get(f"{SUBS}/current", headers=auth(user)))
    assert sub["status"] == "expired"
    await inbox.one("subscription.expired", sub, uid)

    # every event exactly once: what was delivered is what the outbox holds, one delivery each
    delivered = [r.event["type"] for r in receiver.received]
    stored = await rows(engine, "SELECT type FROM webhook_events WHERE user_id = :u", u=user.user_id)
    assert sorted(delivered) == sorted(r.type for r in stored)
    assert len({r.webhook_id for r in receiver.received}) == len(receiver.received)
    assert sorted(set(delivered)) == sorted(
        {
            "subscription.created",
            "subscription.upgraded",
            "subscription.downgrade_scheduled",
            "subscription.resumed",
            "subscription.cancelled",
            "subscription.renewed",
            "quota.period_reset",
            "subscription.ended",
            "subscription.expired",
        }
    )


async def test_grant_over_a_running_period_resets_the_quota(
    client: httpx.AsyncClient, engine: AsyncEngine, receiver: Receiver
) -> None:
    user, admin = await make_account(engine), await make_admin(engine)
    _, secret = await create_endpoint(client, auth(user), receiver.url())
    await _ok(await client.post(SUBS, json={"plan": "free"}, headers=auth(user)))
    await _set_tokens(engine, user.user_id, 500)
    sub = await _ok(await client.put(grant_url(user.user_id), json={"plan": "pro"}, headers=auth(admin)))

    events = sorted((verify(r, secret) for r in await receiver.wait_for(3)), key=lambda e: str(e["type"]))
    assert [e["type"] for e in events] == [
        "quota.period_reset",
        "subscription.created",
        "subscription.created",
    ]
    assert events[0]["data"]["previous_tokens_used"] == 500
    assert events[2]["data"]["subscription"] == sub or events[1]["data"]["subscription"] == sub


async def test_an_endpoint_gets_only_the_types_it_chose_and_only_its_owners_events(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    alice, bob = await make_account(engine), await make_account(engine)
    await create_endpoint(client, auth(alice), receiver.url("/alice"), ["subscription.cancelled"])
    await create_endpoint(client, auth(bob), receiver.url("/bob"), ["subscription.created"])
    for who in (alice, bob):
        await _ok(await client.post(SUBS, json={"plan": "pro"}, headers=auth(who)))
        await _ok(await client.post(f"{SUBS}/cancel", headers=auth(who)))

    [to_bob] = await receiver.wait_for(1, path="/bob")
    [to_alice] = await receiver.wait_for(1, path="/alice")
    assert to_bob.event["type"] == "subscription.created" and to_bob.event["data"]["user_id"] == str(
        bob.user_id
    )
    assert to_alice.event["type"] == "subscription.cancelled"
    assert to_alice.event["data"]["user_id"] == str(alice.user_id)

    # four events, all fanned out, into two deliveries and no others
    async def fanned_out() -> bool:
        return not await rows(engine, "SELECT 1 FROM webhook_events WHERE fanned_out_at IS NULL")

    await eventually(fanned_out, app)
    assert len(await rows(engine, "SELECT 1 FROM webhook_deliveries")) == 2


async def test_a_rolled_back_change_leaves_no_event(
    client: httpx.AsyncClient, app: Any, engine: AsyncEngine, receiver: Receiver
) -> None:
    """No event without its change: a request that fails after the change was flushed (here a
    resume after the end: 409, rolled back) leaves no event behind."""
    user = await make_account(engine)
    await create_endpoint(client, auth(user), receiver.url())
    await _ok(await client.post(SUBS, json={"plan": "pro"}, headers=auth(user)))
    await _ok(await client.post(f"{SUBS}/cancel", headers=auth(user)))
    await receiver.wait_for(2)
    await all_recorded(engine, app)
    clock.advance(timedelta(days=31))
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 409
    types = [r.type for r in await rows(engine, "SELECT type FROM webhook_events ORDER BY created_at")]
    # the roll-over the request did before its 409 was rolled back with it
    assert types == ["subscription.created", "subscription.cancelled"]


async def _set_tokens(engine: AsyncEngine, user_id: Any, tokens: int) -> None:
    from tests.subscriptions.helpers import set_sub

    await set_sub(engine, user_id, tokens_used=tokens)

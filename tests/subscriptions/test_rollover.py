"""Period rollover (API.md §4) over HTTP and through the sweep: exact boundaries, catch-up,
idempotence, and exactly one reset when requests on two instances and sweepers race."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from joyhub.core.config import Settings
from joyhub.ops import sweeper
from joyhub.subscriptions import rollover
from tests.factories import make_account, make_subscription
from tests.subscriptions.helpers import (
    SUBS,
    audit_actions,
    audit_rows,
    auth,
    make_bulk_subscriptions,
    set_plan,
    set_sub,
    sub_row,
    ts,
)

pytestmark = pytest.mark.integration


async def _current(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    r = await client.get(f"{SUBS}/current", headers=headers)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


async def test_rollover_after_one_period(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    first = (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).json()["data"]
    t0 = ts(first["current_period_start"])
    await set_sub(engine, user.user_id, tokens_used=777)

    clock.advance(timedelta(days=29, hours=23))
    data = await _current(client, auth(user))
    assert data["tokens_used"] == 777 and ts(data["current_period_start"]) == t0

    clock.advance(timedelta(days=1, hours=2))  # 31 days and 1 hour in
    data = await _current(client, auth(user))
    assert (data["status"], data["tokens_used"], data["tokens_remaining"]) == ("active", 0, 50_000)
    assert ts(data["current_period_start"]) == t0 + timedelta(days=30)
    assert ts(data["current_period_end"]) == t0 + timedelta(days=60)

    # idempotent: reading again changes nothing and records nothing
    assert await _current(client, auth(user)) == data
    [renew] = await audit_rows(engine, action="subscription.renew")
    assert renew.actor_id is None and renew.target_type == "subscription"
    assert renew.changes["tokens_used"] == {"before": 777, "after": 0}
    assert renew.changes["current_period_start"]["after"] == (t0 + timedelta(days=30)).isoformat()


async def test_rollover_after_three_missed_periods(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    first = (await client.post(SUBS, json={"plan": "free"}, headers=auth(user))).json()["data"]
    t0 = ts(first["current_period_start"])
    await set_sub(engine, user.user_id, tokens_used=1_000)

    clock.advance(timedelta(days=95))  # boundaries at 30, 60 and 90 days passed unseen
    data = await _current(client, auth(user))
    assert ts(data["current_period_start"]) == t0 + timedelta(days=90)
    assert ts(data["current_period_end"]) == t0 + timedelta(days=120)
    assert (data["tokens_used"], data["tokens_remaining"]) == (0, 1_000)
    assert await audit_actions(engine) == ["subscription.create", "subscription.renew"]


async def test_rollover_boundaries_are_exact(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", tokens_used=9)
    row = await sub_row(engine, user.user_id)
    assert row is not None
    end = row.current_period_end
    # one second before the end of the third period: still in the second one
    clock.advance(end + timedelta(days=60, seconds=-1) - utcnow())
    data = await _current(client, auth(user))
    assert ts(data["current_period_start"]) == end + timedelta(days=30)
    assert ts(data["current_period_end"]) == end + timedelta(days=60)
    # at (just past) the boundary: the third period begins exactly where the second ended
    clock.advance(timedelta(seconds=1))
    data = await _current(client, auth(user))
    assert ts(data["current_period_start"]) == end + timedelta(days=60)
    assert ts(data["current_period_end"]) == end + timedelta(days=90)
    assert len(await audit_rows(engine, action="subscription.renew")) == 2


async def test_scheduled_downgrade_after_several_missed_periods_uses_the_new_length(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await set_plan(engine, "free", period_days=10)
    await make_subscription(engine, user.user_id, "pro", scheduled_plan_code="free", tokens_used=5)
    row = await sub_row(engine, user.user_id)
    assert row is not None
    end = row.current_period_end
    clock.advance(timedelta(days=30 + 25))  # pro period ends at 30; free periods of 10 days after
    data = await _current(client, auth(user))
    assert (data["plan"], data["scheduled_plan"], data["tokens_used"]) == ("free", None, 0)
    assert ts(data["current_period_start"]) == end + timedelta(days=20)
    assert ts(data["current_period_end"]) == end + timedelta(days=30)


async def test_cancellation_pending_with_downgrade_ends_as_cancelled(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(
        engine, user.user_id, "enterprise", scheduled_plan_code="pro", cancel_at_period_end=True
    )
    clock.advance(timedelta(days=100))
    data = await _current(client, auth(user))
    assert (data["status"], data["plan"], data["scheduled_plan"]) == ("cancelled", "enterprise", None)
    assert await audit_actions(engine) == ["subscription.cancelled"]


async def test_expires_at_in_the_past_makes_it_expired(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(
        engine, user.user_id, "pro", expires_at=utcnow() + timedelta(days=10), tokens_used=50
    )
    clock.advance(timedelta(days=9))
    assert (await _current(client, auth(user)))["status"] == "active"
    clock.advance(timedelta(days=2))
    data = await _current(client, auth(user))
    assert (data["status"], data["cancel_at_period_end"]) == ("expired", False)
    assert data["tokens_used"] == 50  # still in its first period when it expired
    [entry] = await audit_rows(engine, action="subscription.expire")
    assert entry.changes["status"] == {"before": "active", "after": "expired"}
    r = await client.post(f"{SUBS}/resume", headers=auth(user))
    assert r.status_code == 409


async def test_expiry_after_renewals_renews_up_to_it_then_expires(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", tokens_used=50)
    row = await sub_row(engine, user.user_id)
    assert row is not None
    end = row.current_period_end
    await set_sub(engine, user.user_id, expires_at=end + timedelta(days=45))
    clock.advance(timedelta(days=200))
    data = await _current(client, auth(user))
    assert (data["status"], data["tokens_used"]) == ("expired", 0)
    # the last period begun before the expiry: the one starting 30 days after the first end
    assert ts(data["current_period_start"]) == end + timedelta(days=30)
    assert await audit_actions(engine) == ["subscription.expire"]


async def test_past_period_end_cancel_applies_before_the_request(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A change request first lets time do its work: here a renewal, then the upgrade."""
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "free", tokens_used=999)
    clock.advance(timedelta(days=31))
    data = (await client.post(SUBS, json={"plan": "pro"}, headers=auth(user))).json()["data"]
    assert (data["plan"], data["tokens_used"]) == ("pro", 0)
    assert await audit_actions(engine) == ["subscription.renew", "subscription.upgrade"]


async def test_two_instances_and_sweepers_racing_roll_over_exactly_once(
    make_client: Any, engine: AsyncEngine, settings: Settings
) -> None:
    a = await make_client(own_engine=True)
    b = await make_client(own_engine=True)
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", tokens_used=4_321)
    row = await sub_row(engine, user.user_id)
    assert row is not None
    end = row.current_period_end
    clock.advance(timedelta(days=31))

    calls: list[Any] = []
    for _ in range(6):
        calls.append(a.get(f"{SUBS}/current", headers=auth(user)))
        calls.append(b.get(f"{SUBS}/current", headers=auth(user)))
    calls.append(sweeper.sweep_once(a.app.state.sessionmaker, settings))
    calls.append(sweeper.sweep_once(b.app.state.sessionmaker, settings))
    results = await asyncio.gather(*calls)

    responses = results[:-2]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    seen = {(r.json()["data"]["current_period_start"], r.json()["data"]["tokens_used"]) for r in responses}
    assert len(seen) == 1
    (start, used) = seen.pop()
    assert ts(start) == end and used == 0
    sweeps = results[-2:]
    assert sum(s["subscription_rollover"] for s in sweeps) in (0, 1)

    renewals = await audit_rows(engine, action="subscription.renew")
    assert len(renewals) == 1
    row = await sub_row(engine, user.user_id)
    assert row is not None
    assert (row.current_period_start, row.current_period_end, row.tokens_used) == (
        end,
        end + timedelta(days=30),
        0,
    )


async def test_sweep_rolls_every_due_subscription_in_batches(
    engine: AsyncEngine, make_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollover, "SWEEP_BATCH_SIZE", 4)
    a = await make_client(own_engine=True)
    b = await make_client(own_engine=True)
    due = await make_bulk_subscriptions(engine, 23, ended_days_ago=1)
    fresh = await make_account(engine)
    await make_subscription(engine, fresh.user_id, "pro", tokens_used=3)  # not due
    expiring = await make_account(engine)
    await make_subscription(
        engine, expiring.user_id, "pro", expires_at=utcnow() - timedelta(seconds=1), tokens_used=3
    )

    results = await asyncio.gather(
        sweeper.sweep_once(a.app.state.sessionmaker, settings),
        sweeper.sweep_once(b.app.state.sessionmaker, settings),
        sweeper.sweep_once(a.app.state.sessionmaker, settings),
    )
    assert sum(r["subscription_rollover"] for r in results) == 24
    assert len(await audit_rows(engine, action="subscription.renew")) == 23
    assert len(await audit_rows(engine, action="subscription.expire")) == 1
    for user_id in due[:3]:
        row = await sub_row(engine, user_id)
        assert row is not None and row.tokens_used == 0 and row.current_period_end > utcnow()
    fresh_row = await sub_row(engine, fresh.user_id)
    assert fresh_row is not None and fresh_row.tokens_used == 3
    # a second pass has nothing left to do
    again = await sweeper.sweep_once(a.app.state.sessionmaker, settings)
    assert again["subscription_rollover"] == 0


async def test_joyhub_sweep_pass_on_the_apps_sessionmaker(
    app: Any, engine: AsyncEngine, settings: Settings
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "pro", tokens_used=10, cancel_at_period_end=True)
    clock.advance(timedelta(days=30, minutes=1))
    results = await sweeper.sweep_once(app.state.sessionmaker, settings)
    assert results["subscription_rollover"] == 1
    assert all(v >= 0 for v in results.values())
    row = await sub_row(engine, user.user_id)
    assert row is not None and row.status == "cancelled"


async def test_sweep_once_cli_runs_against_a_database_url(
    engine: AsyncEngine, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "free", tokens_used=10)
    clock.advance(timedelta(days=31))
    code = await sweeper.sweep_once_cli(engine.url.render_as_string(hide_password=False), settings)
    assert code == 0
    assert "subscription_rollover" in capsys.readouterr().out
    row = await sub_row(engine, user.user_id)
    assert row is not None and row.tokens_used == 0


async def test_background_sweep_runs_in_serve_and_stops_with_the_app(
    make_client: Any, engine: AsyncEngine
) -> None:
    c = await make_client(sweep_interval_seconds=0.05)
    task = c.app.state.sweep_task
    assert not task.done()
    user = await make_account(engine)
    await make_subscription(engine, user.user_id, "free", tokens_used=10)
    clock.advance(timedelta(days=31))
    used = None
    for _ in range(250):  # poll (up to ~5 s) rather than sleep a fixed time
        row = await sub_row(engine, user.user_id)
        assert row is not None
        used = row.tokens_used
        if used == 0:
            break
        await asyncio.sleep(0.02)
    assert used == 0
    assert len(await audit_rows(engine, action="subscription.renew")) == 1


async def test_background_sweep_survives_a_failing_pass(
    make_client: Any, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = sweeper.sweep_once

    async def flaky(*args: Any, **kwargs: Any) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database blip")
        return await real(*args, **kwargs)

    monkeypatch.setattr(sweeper, "sweep_once", flaky)
    c = await make_client(sweep_interval_seconds=0.02)
    for _ in range(200):
        if calls["n"] >= 3:
            break
        await asyncio.sleep(0.01)
    assert calls["n"] >= 3
    assert not c.app.state.sweep_task.done()

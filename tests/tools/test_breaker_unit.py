"""The circuit breaker's rules with an injected clock, in-process and (with REDIS_URL) on Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import pytest

from joyhub.tools.breaker import Breakers, InProcessBreakers, RedisBreakers

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def breakers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Breakers, FakeClock]]:
    clock = FakeClock()
    if request.param == "memory":
        yield InProcessBreakers(3, 10.0, clock=clock), clock
        return
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("REDIS_URL not set")
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        yield RedisBreakers(client, 3, 10.0, clock=clock, prefix=f"test:{uuid.uuid4().hex}:"), clock
    finally:
        await client.aclose()


async def test_opens_after_threshold_consecutive_failures(breakers: tuple[Breakers, FakeClock]) -> None:
    b, clock = breakers
    permit = await b.acquire("t", 5)
    assert permit.allowed and permit.clean and not permit.trial
    assert await b.record_failure("t", trial=False) is False
    assert await b.record_failure("t", trial=False) is False
    assert (await b.view("t")).consecutive_failures == 2
    assert await b.record_failure("t", trial=False) is True
    view = await b.view("t")
    assert view.state == "open"
    assert view.opened_until is not None
    assert view.opened_until.timestamp() == pytest.approx(clock.now + 10)
    denied = await b.acquire("t", 5)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(10)


async def test_success_resets_the_count(breakers: tuple[Breakers, FakeClock]) -> None:
    b, _ = breakers
    await b.record_failure("t", trial=False)
    await b.record_failure("t", trial=False)
    permit = await b.acquire("t", 5)
    assert permit.allowed and not permit.clean
    await b.record_success("t", trial=False, clean=permit.clean)
    assert (await b.view("t")).consecutive_failures == 0
    await b.record_failure("t", trial=False)
    await b.record_failure("t", trial=False)
    assert (await b.view("t")).state == "closed"


async def test_half_open_lets_exactly_one_trial_through(breakers: tuple[Breakers, FakeClock]) -> None:
    b, clock = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    clock.now += 10.5
    assert (await b.view("t")).state == "half_open"
    permits = await asyncio.gather(*(b.acquire("t", 5) for _ in range(20)))
    trials = [p for p in permits if p.allowed]
    assert len(trials) == 1 and trials[0].trial
    assert all(not p.allowed and p.retry_after > 0 for p in permits if not p.allowed)
    # the trial succeeds: closed, count reset
    await b.record_success("t", trial=True, clean=False)
    view = await b.view("t")
    assert (view.state, view.consecutive_failures, view.opened_until) == ("closed", 0, None)
    assert (await b.acquire("t", 5)).allowed


async def test_failed_trial_reopens(breakers: tuple[Breakers, FakeClock]) -> None:
    b, clock = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    clock.now += 11
    trial = await b.acquire("t", 5)
    assert trial.trial
    assert await b.record_failure("t", trial=True) is True
    view = await b.view("t")
    assert view.state == "open"
    assert view.opened_until is not None
    assert view.opened_until.timestamp() == pytest.approx(clock.now + 10)
    assert not (await b.acquire("t", 5)).allowed


async def test_trial_lease_expires_and_release_frees_it(breakers: tuple[Breakers, FakeClock]) -> None:
    b, clock = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    clock.now += 11
    first = await b.acquire("t", 5)
    assert first.trial
    assert not (await b.acquire("t", 5)).allowed
    clock.now += 6  # the trial's worker died: its lease lapses
    second = await b.acquire("t", 5)
    assert second.trial
    await b.release("t", second)
    assert (await b.acquire("t", 5)).trial


async def test_late_results_do_not_close_an_open_circuit(breakers: tuple[Breakers, FakeClock]) -> None:
    b, _ = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    await b.record_success("t", trial=False, clean=False)  # a call admitted before it opened
    assert (await b.view("t")).state == "open"
    await b.record_failure("t", trial=False)
    view = await b.view("t")
    assert view.state == "open"
    assert view.consecutive_failures == 4


async def test_reset_closes(breakers: tuple[Breakers, FakeClock]) -> None:
    b, _ = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    await b.reset("t")
    assert (await b.view("t")).state == "closed"
    views = await b.views(["t", "other"])
    assert {v.state for v in views.values()} == {"closed"}


async def test_tools_are_independent(breakers: tuple[Breakers, FakeClock]) -> None:
    b, _ = breakers
    for _ in range(3):
        await b.record_failure("a", trial=False)
    assert (await b.view("a")).state == "open"
    assert (await b.acquire("b", 5)).allowed


async def test_redis_outage_fails_open() -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        b = RedisBreakers(client, 1, 10.0)
        permit = await b.acquire("t", 5)
        assert permit.allowed
        assert await b.record_failure("t", trial=False) is False
        assert (await b.view("t")).state == "closed"
    finally:
        await client.aclose()


async def test_a_caller_not_ready_to_call_does_not_take_the_trial(
    breakers: tuple[Breakers, FakeClock],
) -> None:
    """`claim_trial=False` (the gateway before it knows the call will be admitted) learns that a
    trial is due without claiming it, so a caller that is then refused cannot keep the one trial
    from a caller that would make it."""
    b, clock = breakers
    for _ in range(3):
        await b.record_failure("t", trial=False)
    assert (await b.acquire("t", 5, claim_trial=False)).trial_due is False  # open: not due yet
    clock.now += 11
    for _ in range(3):
        asked = await b.acquire("t", 5, claim_trial=False)
        assert (asked.allowed, asked.trial_due) == (False, True)
    trial = await b.acquire("t", 5)
    assert trial.allowed and trial.trial and not trial.trial_due
    others = await b.acquire("t", 5, claim_trial=False)
    assert (others.allowed, others.trial_due) == (False, False)  # the trial is running
    # closed: every caller passes, claiming or not
    await b.record_success("t", trial=True, clean=False)
    assert (await b.acquire("t", 5, claim_trial=False)).allowed

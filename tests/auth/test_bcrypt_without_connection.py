"""No pooled database connection waits on bcrypt, and bcrypt's queue is bounded.

bcrypt runs on a small thread pool (core/security.py), so under a burst every login waits in its
queue. A request that held its pooled connection while waiting there would drain the pool and
turn every other request into 503 after DB_POOL_TIMEOUT. These tests hold every bcrypt call on
its thread (`SlowBcrypt`) while more requests wait than the pool has connections, and check that
the pool has nothing checked out and other requests are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from joyhub.auth.bootstrap import ensure_admin_from_settings
from joyhub.core import security
from tests.auth.support import (
    API,
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    Registered,
    bearer,
    execute,
    issue_reset_token,
    login,
    register,
    scalar,
    unique_email,
)

pytestmark = pytest.mark.integration

CONCURRENT = 6  # more than the pool of the instance under test (2 connections, no overflow)
SMALL_POOL = {"own_engine": True, "db_pool_size": 2, "db_max_overflow": 0, "db_pool_timeout": 2}
TOKEN_IN_LINK = re.compile(r"reset-password\?token=([A-Za-z0-9_-]+)")


class SlowBcrypt:
    """Holds bcrypt calls on the pool thread while held, as a long queue would keep them waiting."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        names: tuple[str, ...] = ("hash_password_sync", "verify_password_sync"),
    ) -> None:
        self._open = threading.Event()
        self._open.set()
        for name in names:
            monkeypatch.setattr(security, name, self._gated(getattr(security, name)))

    def _gated(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any) -> Any:
            self._open.wait(timeout=30)  # never blocks a pool thread for good, whatever happens
            return fn(*args)

        return gated

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()


@pytest.fixture
def slow_bcrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowBcrypt]:
    gate = SlowBcrypt(monkeypatch)
    try:
        yield gate
    finally:
        gate.release()


async def wait_for_pending(count: int, timeout: float = 8.0) -> None:
    """Until `count` bcrypt jobs are waiting or running in this process."""
    deadline = time.monotonic() + timeout
    while security.bcrypt_pending() != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{security.bcrypt_pending()} bcrypt jobs pending, expected {count}")
        await asyncio.sleep(0.01)


async def while_bcrypt_is_held(
    gate: SlowBcrypt,
    requests: Sequence[Awaitable[httpx.Response]],
    meanwhile: Callable[[], Awaitable[None]],
) -> list[httpx.Response]:
    """Start `requests` with bcrypt held, run `meanwhile` once all of them wait on bcrypt, then
    let bcrypt go and return their responses."""
    await wait_for_pending(0)
    gate.hold()
    tasks = [asyncio.ensure_future(r) for r in requests]
    try:
        await wait_for_pending(len(tasks))
        await meanwhile()
    finally:
        gate.release()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return [r for r in done if isinstance(r, httpx.Response)]


def pool_of(client: httpx.AsyncClient) -> QueuePool:
    pool: QueuePool = client.app.state.engine.pool  # type: ignore[attr-defined]
    return pool


async def others_are_served(client: httpx.AsyncClient, watcher: Registered) -> None:
    """No connection is checked out, and more requests than the pool has connections, each
    needing one, are answered at once."""
    assert pool_of(client).checkedout() == 0
    calls = [client.get(f"{API}/users/me", headers=watcher.headers) for _ in range(4)]
    calls.append(client.get("/ready"))
    responses = await asyncio.gather(*calls)
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert pool_of(client).checkedout() == 0


async def test_logins_waiting_for_bcrypt_hold_no_connection(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, engine: AsyncEngine
) -> None:
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    accounts = [await register(c) for _ in range(CONCURRENT - 2)]
    await execute(engine, "UPDATE users SET last_login_at = NULL")
    attempts = [login(c, a.email, a.password) for a in accounts]
    attempts.append(login(c, unique_email("nobody"), STRONG_PASSWORD))  # the dummy hash
    attempts.append(login(c, accounts[0].email, "Wrong-Password-1"))  # a wrong password

    responses = await while_bcrypt_is_held(slow_bcrypt, attempts, lambda: others_are_served(c, watcher))

    assert [r.status_code for r in responses] == [200] * (CONCURRENT - 2) + [401, 401]
    assert {r.json()["error"]["code"] for r in responses[-2:]} == {"INVALID_CREDENTIALS"}
    for account, r in zip(accounts, responses, strict=False):
        me = await c.get(f"{API}/users/me", headers=bearer(r.json()["data"]["access_token"]))
        assert me.json()["data"]["email"] == account.email
    # the rest of the login went through as before: last login recorded, one session per login
    assert await scalar(engine, "SELECT count(*) FROM users WHERE last_login_at IS NOT NULL") == len(accounts)
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions") == 1 + 2 * len(accounts)


async def test_oauth2_token_logins_hold_no_connection(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt
) -> None:
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    accounts = [await register(c) for _ in range(CONCURRENT)]
    attempts = [
        c.post(f"{API}/auth/token", data={"username": a.email, "password": a.password}) for a in accounts
    ]
    responses = await while_bcrypt_is_held(slow_bcrypt, attempts, lambda: others_are_served(c, watcher))
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    assert all(r.json()["access_token"] for r in responses)


async def test_a_disabled_account_is_refused_after_bcrypt(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, engine: AsyncEngine
) -> None:
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    account = await register(c)
    await execute(engine, "UPDATE users SET is_active = false WHERE email = :e", e=account.email)
    responses = await while_bcrypt_is_held(
        slow_bcrypt, [login(c, account.email, account.password)], lambda: others_are_served(c, watcher)
    )
    assert responses[0].status_code == 403
    assert responses[0].json()["error"]["code"] == "ACCOUNT_DISABLED"


async def test_registrations_waiting_for_bcrypt_hold_no_connection(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, engine: AsyncEngine
) -> None:
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    emails = [unique_email("burst") for _ in range(CONCURRENT)]
    attempts = [
        c.post(f"{API}/auth/register", json={"name": "Burst", "email": e, "password": STRONG_PASSWORD})
        for e in emails
    ]
    responses = await while_bcrypt_is_held(slow_bcrypt, attempts, lambda: others_are_served(c, watcher))
    assert [r.status_code for r in responses] == [201] * CONCURRENT
    assert await scalar(engine, "SELECT count(*) FROM users") == CONCURRENT + 1


@pytest.mark.parametrize("held", ["verify_password_sync", "hash_password_sync"])
async def test_password_changes_hold_no_connection_in_either_bcrypt_step(
    make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    """Checking the current password and hashing the new one each wait with no connection."""
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    accounts = [await register(c) for _ in range(CONCURRENT)]
    gate = SlowBcrypt(monkeypatch, names=(held,))  # only the step under test is held
    attempts = [
        c.post(
            f"{API}/users/me/password",
            json={"current_password": a.password, "new_password": OTHER_PASSWORD},
            headers=a.headers,
        )
        for a in accounts
    ]
    try:
        responses = await while_bcrypt_is_held(gate, attempts, lambda: others_are_served(c, watcher))
    finally:
        gate.release()
    assert [r.status_code for r in responses] == [200] * CONCURRENT, [r.text for r in responses]
    for account, r in zip(accounts, responses, strict=True):
        assert (await c.get(f"{API}/users/me", headers=account.headers)).status_code == 401
        fresh = r.json()["data"]["access_token"]
        assert (await c.get(f"{API}/users/me", headers=bearer(fresh))).status_code == 200
        assert (await login(c, account.email, OTHER_PASSWORD)).status_code == 200


async def _reset_tokens(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, accounts: list[Registered]
) -> list[str]:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    return [await issue_reset_token(engine, account.user_id) for account in accounts]


async def test_reset_confirms_hold_no_connection_while_hashing(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, caplog: pytest.LogCaptureFixture
) -> None:
    c = await make_client(**SMALL_POOL)
    watcher = await register(c)
    accounts = [await register(c) for _ in range(CONCURRENT)]
    tokens = await _reset_tokens(c, caplog, accounts)
    attempts = [
        c.post(f"{API}/auth/password-reset/confirm", json={"token": t, "new_password": OTHER_PASSWORD})
        for t in tokens
    ]
    responses = await while_bcrypt_is_held(slow_bcrypt, attempts, lambda: others_are_served(c, watcher))
    assert [r.status_code for r in responses] == [200] * CONCURRENT, [r.text for r in responses]
    for account in accounts:
        assert (await c.get(f"{API}/users/me", headers=account.headers)).status_code == 401
        assert (await login(c, account.email, OTHER_PASSWORD)).status_code == 200


async def test_parallel_confirms_racing_past_the_check_have_one_winner(
    make_client: Callable[..., Any],
    slow_bcrypt: SlowBcrypt,
    caplog: pytest.LogCaptureFixture,
    engine: AsyncEngine,
) -> None:
    """Both confirms pass the read-only check and hash; the consume decides, the loser leaves
    nothing behind (no password, revocation or session of its own) and logs no change."""
    c = await make_client(own_engine=True)
    account = await register(c)
    (token,) = await _reset_tokens(c, caplog, [account])
    caplog.set_level(logging.INFO, logger="joyhub.auth")
    passwords = ["Racing-Password-1a", "Racing-Password-2b"]
    attempts = [
        c.post(f"{API}/auth/password-reset/confirm", json={"token": token, "new_password": pw})
        for pw in passwords
    ]

    async def nothing() -> None:
        return None

    responses = await while_bcrypt_is_held(slow_bcrypt, attempts, nothing)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 400]
    loser = next(r for r in responses if r.status_code == 400)
    assert loser.json()["error"]["code"] == "INVALID_RESET_TOKEN"
    results = [(await login(c, account.email, pw)).status_code for pw in passwords]
    assert sorted(results) == [200, 401]
    # registration, the winner's reset and the login just made: no session of the loser
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions") == 3
    assert await scalar(engine, "SELECT count(*) FROM audit_logs WHERE action = 'user.password_reset'") == 1
    logged = [r.__dict__ for r in caplog.records if r.getMessage() == "password replaced"]
    assert [r["reason"] for r in logged] == ["password_reset"]  # the winner's only


async def test_start_up_hashes_the_admin_password_before_taking_a_connection(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, engine: AsyncEngine
) -> None:
    c = await make_client(**SMALL_POOL, admin_email="boss@example.com", admin_password="Admin-Secret-Pass-42")
    await execute(engine, "DELETE FROM users")
    await wait_for_pending(0)
    slow_bcrypt.hold()
    bootstrap = asyncio.ensure_future(ensure_admin_from_settings(c.app))
    try:
        await wait_for_pending(1)
        assert pool_of(c).checkedout() == 0
    finally:
        slow_bcrypt.release()
        await bootstrap
    assert await scalar(engine, "SELECT role FROM users WHERE email = 'boss@example.com'") == "admin"


async def test_start_up_does_not_hash_for_an_existing_admin(
    make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await make_client(admin_email="boss@example.com", admin_password="Admin-Secret-Pass-42")
    hashed: list[int] = []
    real = security.hash_password_sync

    def counting(password: str, rounds: int) -> str:
        hashed.append(rounds)
        return real(password, rounds)

    monkeypatch.setattr(security, "hash_password_sync", counting)
    await ensure_admin_from_settings(c.app)
    assert hashed == []


# --- the bounded queue -------------------------------------------------------------------------


@pytest.fixture
def small_queue(monkeypatch: pytest.MonkeyPatch) -> int:
    """A queue of 2; the app sets it from its settings (BCRYPT_MAX_PENDING) when it is made, and
    the monkeypatch puts the process default back afterwards."""
    monkeypatch.setattr(security, "BCRYPT_MAX_PENDING", security.BCRYPT_MAX_PENDING)
    return 2


async def test_a_full_bcrypt_queue_answers_503_with_retry_after_and_counts_no_failure(
    make_client: Callable[..., Any], slow_bcrypt: SlowBcrypt, small_queue: int
) -> None:
    c = await make_client(login_max_failures=1, bcrypt_max_pending=small_queue)
    assert small_queue == security.BCRYPT_MAX_PENDING
    queued = [await register(c) for _ in range(small_queue)]
    refused = await register(c)
    await wait_for_pending(0)
    slow_bcrypt.hold()
    waiting = [asyncio.ensure_future(login(c, a.email, a.password)) for a in queued]
    try:
        await wait_for_pending(small_queue)
        for r in (
            await login(c, refused.email, refused.password),
            await c.post(
                f"{API}/auth/register",
                json={"name": "Late", "email": unique_email(), "password": STRONG_PASSWORD},
            ),
        ):
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert int(r.headers["Retry-After"]) >= 1
        assert security.bcrypt_pending() == small_queue  # refusals took no place in the queue
    finally:
        slow_bcrypt.release()
        responses = await asyncio.gather(*waiting)
    assert [r.status_code for r in responses] == [200] * small_queue
    await wait_for_pending(0)
    # with a limit of one failure, a counted refusal would make this 429
    assert (await login(c, refused.email, refused.password)).status_code == 200


async def test_a_cancelled_waiter_gives_its_place_back(slow_bcrypt: SlowBcrypt) -> None:
    await wait_for_pending(0)
    slow_bcrypt.hold()
    running = asyncio.ensure_future(security.hash_password("first", 4))
    queued = asyncio.ensure_future(security.hash_password("second", 4))
    try:
        await wait_for_pending(2)
        queued.cancel()
        await wait_for_pending(1)  # the queued job was dropped, not left to run
    finally:
        slow_bcrypt.release()
    assert security.verify_password_sync("first", await running)
    await wait_for_pending(0)


async def test_a_failing_hash_gives_its_place_back() -> None:
    await wait_for_pending(0)
    assert await security.verify_password("anything", "not a bcrypt hash") is False
    with pytest.raises(ValueError):
        await security.hash_password("anything", 3)  # bcrypt refuses a cost below 4
    await wait_for_pending(0)

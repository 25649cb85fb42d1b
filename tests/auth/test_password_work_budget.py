"""Password work per client address (issue 12, item 5): junk from one address is refused with
429 before it costs a hash, whatever emails it names, while other addresses log in; the
registrations of one address are limited too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core import security
from tests.auth.support import (
    API,
    OTHER_PASSWORD,
    STRONG_PASSWORD,
    client_from,
    issue_reset_token,
    login,
    register,
    unique_email,
)

pytestmark = pytest.mark.integration

ATTACKER = "198.51.100.66"
USER_ADDRESS = "203.0.113.7"


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every bcrypt hash or verification the hub runs, by kind."""
    done: list[str] = []
    real_hash, real_verify = security.hash_password_sync, security.verify_password_sync

    def counted_hash(password: str, rounds: int) -> str:
        done.append("hash")
        return real_hash(password, rounds)

    def counted_verify(password: str, password_hash: str) -> bool:
        done.append("verify")
        return real_verify(password, password_hash)

    monkeypatch.setattr(security, "hash_password_sync", counted_hash)
    monkeypatch.setattr(security, "verify_password_sync", counted_verify)
    return done


async def test_junk_logins_from_one_address_stop_before_bcrypt(
    make_client: Callable[..., Any], engine: AsyncEngine, hashes: list[str]
) -> None:
    c: httpx.AsyncClient = await make_client(password_work_max_per_address=5, password_work_window_seconds=60)
    async with client_from(c, USER_ADDRESS) as user_side:
        account = await register(user_side)
    security.dummy_hash(4)  # made once per process (cached): not part of what is counted
    hashes.clear()
    async with client_from(c, ATTACKER) as attacker:
        # every attempt names a fresh email: a new failed-login bucket each time, one budget
        answers = await asyncio.gather(
            *(
                attacker.post(f"{API}/auth/login", json={"email": unique_email(), "password": "Junk-Pass-1!"})
                for _ in range(8)
            )
        )
        codes = sorted(r.status_code for r in answers)
        assert codes == [401] * 5 + [429] * 3
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert len(hashes) == 5  # the refused ones cost no hash
        # the OAuth2 form is the same work from the same budget
        r = await attacker.post(
            f"{API}/auth/token", data={"username": account.email, "password": STRONG_PASSWORD}
        )
        assert r.status_code == 429
    # a real user elsewhere is not held back
    async with client_from(c, USER_ADDRESS) as user_side:
        assert (await login(user_side, account.email, STRONG_PASSWORD)).status_code == 200
    assert len(hashes) == 6


async def test_every_kind_of_password_work_shares_the_budget(
    make_client: Callable[..., Any], engine: AsyncEngine, hashes: list[str]
) -> None:
    c: httpx.AsyncClient = await make_client(password_work_max_per_address=4)
    async with client_from(c, USER_ADDRESS) as setup:
        account = await register(setup)
    token = await issue_reset_token(engine, account.user_id)
    async with client_from(c, ATTACKER) as same:
        assert (await login(same, account.email, STRONG_PASSWORD)).status_code == 200  # 1
        r = await same.post(
            f"{API}/auth/token", data={"username": account.email, "password": STRONG_PASSWORD}
        )
        assert r.status_code == 200  # 2
        second = await register(same)  # 3
        r = await same.post(
            f"{API}/auth/password-reset/confirm", json={"token": token, "new_password": OTHER_PASSWORD}
        )
        assert r.status_code == 200  # 4
        hashes.clear()
        over = [
            await login(same, account.email, OTHER_PASSWORD),
            await same.post(
                f"{API}/auth/register",
                json={"name": "n", "email": unique_email(), "password": STRONG_PASSWORD},
            ),
            await same.post(
                f"{API}/users/me/password",
                json={"current_password": STRONG_PASSWORD, "new_password": OTHER_PASSWORD},
                headers=second.headers,
            ),
        ]
        assert [r.status_code for r in over] == [429, 429, 429]
        assert hashes == []


async def test_registrations_are_limited_per_address(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    c: httpx.AsyncClient = await make_client(register_max_per_address_per_hour=2)

    async def attempt(client: httpx.AsyncClient) -> httpx.Response:
        body = {"name": "n", "email": unique_email(), "password": STRONG_PASSWORD}
        return await client.post(f"{API}/auth/register", json=body)

    async with client_from(c, ATTACKER) as attacker:
        codes = [(await attempt(attacker)).status_code for _ in range(4)]
    assert codes == [201, 201, 429, 429]
    async with client_from(c, USER_ADDRESS) as other:
        assert (await attempt(other)).status_code == 201


@pytest.mark.unit
async def test_refusals_of_an_address_are_remembered_until_they_can_change() -> None:
    """Under a flood, a refused address costs no store round trip until its Retry-After; the
    failed-login buckets (cleared by a success) are always asked."""
    from datetime import timedelta

    from joyhub.auth.throttle import Decision, RefusalMemo, address_bucket, login_bucket
    from joyhub.core.clock import utcnow

    class Store:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def acquire(self, bucket: str, *, limit: int, window: timedelta, now: Any) -> Decision:
            self.asked.append(bucket)
            return Decision(False, 30)

        async def clear(self, bucket: str) -> None:
            return None

    store = Store()
    memo = RefusalMemo(store, {})
    now = utcnow()
    address, login_key = (
        address_bucket("password_work", "198.51.100.1"),
        login_bucket("a@b.c", "198.51.100.1"),
    )
    window = timedelta(minutes=1)
    for second in range(5):
        at = now + timedelta(seconds=second)
        decision = await memo.acquire(address, limit=3, window=window, now=at)
        assert (decision.allowed, decision.retry_after) == (False, 30 - second)
        assert not (await memo.acquire(login_key, limit=3, window=window, now=at)).allowed
    assert store.asked.count(address) == 1 and store.asked.count(login_key) == 5
    await memo.acquire(address, limit=3, window=window, now=now + timedelta(seconds=31))
    assert store.asked.count(address) == 2

"""POST /auth/login and /auth/token (API.md §2): credentials, disabled accounts, throttling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.auth.support import (
    API,
    STRONG_PASSWORD,
    bearer,
    client_from,
    execute,
    login,
    register,
    scalar,
    unique_email,
)

pytestmark = pytest.mark.integration


async def test_login_returns_a_token_pair(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    await execute(engine, "UPDATE users SET last_login_at = NULL")
    r = await client.post(
        f"{API}/auth/login",
        json={"email": account.email.upper(), "password": STRONG_PASSWORD},
        headers={"User-Agent": "pytest-agent/1.0"},
    )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    pair = body["data"]
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 1800
    me = await client.get(f"{API}/users/me", headers=bearer(pair["access_token"]))
    assert me.json()["data"]["email"] == account.email
    assert await scalar(engine, "SELECT last_login_at IS NOT NULL FROM users") is True
    assert (
        await scalar(
            engine,
            "SELECT count(*) FROM auth_sessions"
            " WHERE user_agent = 'pytest-agent/1.0' AND client_ip = '127.0.0.1'",
        )
        == 1
    )


async def test_access_token_lifetime_follows_settings(make_client: Callable[..., Any]) -> None:
    c = await make_client(access_token_expire_minutes=15)
    account = await register(c)
    r = await login(c, account.email, account.password)
    assert r.json()["data"]["expires_in"] == 900


async def test_unknown_email_and_wrong_password_look_the_same(client: httpx.AsyncClient) -> None:
    account = await register(client)
    wrong = await login(client, account.email, "Wrong-Password-1")
    unknown = await login(client, unique_email(), "Wrong-Password-1")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["error"] == unknown.json()["error"]
    assert wrong.json()["error"]["code"] == "INVALID_CREDENTIALS"
    assert wrong.headers.get("www-authenticate") == "Bearer"


async def test_disabled_account(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    await execute(engine, "UPDATE users SET is_active = false WHERE id = :id", id=account.user_id)
    right = await login(client, account.email, account.password)
    assert right.status_code == 403 and right.json()["error"]["code"] == "ACCOUNT_DISABLED"
    wrong = await login(client, account.email, "Wrong-Password-1")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "INVALID_CREDENTIALS"


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a@example.com"},
        {"password": "x"},
        {"email": "a@example.com", "password": "x", "remember": True},
        {"email": "a\x00@example.com", "password": "x"},
        {"email": "a@example.com", "password": "x\x00y"},
        {"email": "e" * 1_000_000, "password": "x"},
    ],
)
async def test_login_validation(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.post(f"{API}/auth/login", json=body)
    assert r.status_code in (413, 422)
    assert r.json()["error"]["code"] in ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE")


async def test_login_with_emoji_password(client: httpx.AsyncClient) -> None:
    account = await register(client, password="Emoji-🦄-Pass-9")
    assert (await login(client, account.email, "Emoji-🦄-Pass-9")).status_code == 200
    assert (await login(client, account.email, "Emoji-🐴-Pass-9")).status_code == 401


# --- throttling -------------------------------------------------------------------------------


async def test_failures_are_throttled_with_retry_after(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=3, login_failure_window_seconds=600)
    account = await register(c)
    for _ in range(3):
        assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401
        clock.advance(timedelta(seconds=10))
    # over the limit: 429 before the password is even looked at (the right one included)
    r = await login(c, account.email, account.password)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "RATE_LIMITED"
    # the oldest failure (30 s ago) leaves the 600 s window in 570 s (less the real time elapsed)
    retry_after = int(r.headers["retry-after"])
    assert retry_after in (569, 570)
    clock.advance(timedelta(seconds=retry_after - 5))
    r = await login(c, account.email, account.password)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5
    clock.advance(timedelta(seconds=5))
    # one failure left the window: one attempt is allowed again
    assert (await login(c, account.email, account.password)).status_code == 200


async def test_window_slides(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=3, login_failure_window_seconds=60)
    account = await register(c)
    for _ in range(3):
        assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401
    assert (await login(c, account.email, "Wrong-Password-1")).status_code == 429
    clock.advance(timedelta(seconds=61))
    assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401


async def test_success_clears_the_bucket(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=3, login_failure_window_seconds=600)
    account = await register(c)
    for _ in range(2):
        assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401
    assert (await login(c, account.email, account.password)).status_code == 200
    for _ in range(3):
        assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401
    assert (await login(c, account.email, account.password)).status_code == 429


async def test_unknown_emails_are_throttled_too(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=2, login_failure_window_seconds=600)
    email = unique_email()
    assert [(await login(c, email, "Wrong-Password-1")).status_code for _ in range(3)] == [401, 401, 429]


async def test_attacker_elsewhere_cannot_lock_out_the_victim(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=3, login_failure_window_seconds=600)
    account = await register(c)
    async with client_from(c, "203.0.113.66") as attacker:
        for _ in range(5):
            await login(attacker, account.email, "Guess-Password-1")
        r = await login(attacker, account.email, account.password)
        assert r.status_code == 429
    # the victim, from their own address, is not affected
    assert (await login(c, account.email, account.password)).status_code == 200


async def test_limit_holds_under_a_parallel_burst(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=3, login_failure_window_seconds=600)
    account = await register(c)
    responses = await asyncio.gather(*(login(c, account.email, "Wrong-Password-1") for _ in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [401] * 3 + [429] * 9


async def test_throttle_holds_across_instances(make_client: Callable[..., Any]) -> None:
    """Two app instances (own pools) share the count: it lives in PostgreSQL or Redis."""
    one = await make_client(login_max_failures=3, login_failure_window_seconds=600, own_engine=True)
    two = await make_client(login_max_failures=3, login_failure_window_seconds=600, own_engine=True)
    account = await register(one)
    for c in (one, two, one):
        assert (await login(c, account.email, "Wrong-Password-1")).status_code == 401
    assert (await login(two, account.email, account.password)).status_code == 429


# --- OAuth2 form endpoint -----------------------------------------------------------------------


async def test_token_endpoint_plain_oauth2_shape(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(
        f"{API}/auth/token",
        data={"username": account.email, "password": account.password, "grant_type": "password"},
    )
    assert r.status_code == 200
    assert set(r.json()) == {"access_token", "token_type"}
    assert r.json()["token_type"] == "bearer"
    me = await client.get(f"{API}/users/me", headers=bearer(r.json()["access_token"]))
    assert me.status_code == 200


async def test_token_endpoint_errors_use_the_envelope(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(f"{API}/auth/token", data={"username": account.email, "password": "Nope-1234!"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "INVALID_CREDENTIALS" and r.json()["data"] is None
    r = await client.post(f"{API}/auth/token", data={"username": account.email})
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_ERROR"
    r = await client.post(f"{API}/auth/token", data={"username": "a\x00b", "password": "x"})
    assert r.status_code == 401
    for form in (
        {"username": "u" * 1_000_000, "password": "x"},
        {"username": account.email, "password": "p" * 1_000_000},
        {"username": account.email, "password": "🦄" * 100},
    ):
        r = await client.post(f"{API}/auth/token", data=form)
        assert r.status_code in (401, 413), r.status_code
        assert r.json()["error"]["code"] in ("INVALID_CREDENTIALS", "PAYLOAD_TOO_LARGE")


async def test_token_endpoint_is_throttled(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=2, login_failure_window_seconds=600)
    account = await register(c)
    form = {"username": account.email, "password": "Wrong-Password-1"}
    assert [(await c.post(f"{API}/auth/token", data=form)).status_code for _ in range(3)] == [401, 401, 429]


async def test_logout_all_ends_token_endpoint_sessions(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(f"{API}/auth/token", data={"username": account.email, "password": account.password})
    form_token = r.json()["access_token"]
    assert (await client.post(f"{API}/auth/logout-all", headers=account.headers)).status_code == 204
    assert (await client.get(f"{API}/users/me", headers=bearer(form_token))).status_code == 401


async def test_throttle_storage_follows_redis_setting(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    """PostgreSQL rows without Redis; with REDIS_URL, a Redis sorted set and no rows."""
    c = await make_client(login_max_failures=3)
    await login(c, unique_email(), "Wrong-Password-1")
    redis = c.app.state.redis  # type: ignore[attr-defined]
    rows = await scalar(engine, "SELECT count(*) FROM throttle_hits WHERE bucket LIKE 'login:%'")
    if redis is None:
        assert rows == 1
    else:
        assert rows == 0
        keys = [k async for k in redis.scan_iter(match="joyhub:throttle:login:*")]
        assert len(keys) == 1 and await redis.zcard(keys[0]) == 1
        assert 0 < await redis.ttl(keys[0]) <= 900 + 60


async def test_unreachable_redis_fails_closed(client: httpx.AsyncClient) -> None:
    """Without its store the throttle cannot count: 503, never an unthrottled login."""
    import redis.asyncio as aioredis

    from tests.auth.support import free_port

    state = client.app.state  # type: ignore[attr-defined]
    saved = state.redis, getattr(state, "auth_redis_throttle", None)
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1, retry=None)
    state.redis, state.auth_redis_throttle = dead, None  # only the throttle looks it up per request
    try:
        r = await login(client, unique_email(), "Wrong-Password-1")
    finally:
        state.redis, state.auth_redis_throttle = saved
        await dead.aclose()
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE" and r.headers["retry-after"] == "2"

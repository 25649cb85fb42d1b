"""POST /users/me/password (API.md §3): every old token dies, a fresh pair is returned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth.support import API, OTHER_PASSWORD, STRONG_PASSWORD, bearer, login, register, scalar

pytestmark = pytest.mark.integration

URL = f"{API}/users/me/password"
ME = f"{API}/users/me"


async def test_change_kills_every_old_token_at_once(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    other = (await login(client, account.email, account.password)).json()["data"]
    r = await client.post(
        URL,
        json={"current_password": STRONG_PASSWORD, "new_password": OTHER_PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200
    pair = r.json()["data"]
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    # the caller's old access token and every other session are dead at once
    for access in (account.access_token, other["access_token"]):
        assert (await client.get(ME, headers=bearer(access))).status_code == 401
    for refresh in (account.refresh_token, other["refresh_token"]):
        assert (await client.post(f"{API}/auth/refresh", json={"refresh_token": refresh})).status_code == 401
    # the new pair works
    assert (await client.get(ME, headers=bearer(pair["access_token"]))).status_code == 200
    assert (
        await client.post(f"{API}/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    ).status_code == 200
    assert (await login(client, account.email, STRONG_PASSWORD)).status_code == 401
    assert (await login(client, account.email, OTHER_PASSWORD)).status_code == 200
    assert await scalar(engine, "SELECT count(*) FROM audit_logs WHERE action = 'user.password_change'") == 1
    changes = await scalar(engine, "SELECT changes::text FROM audit_logs")
    assert OTHER_PASSWORD not in changes and STRONG_PASSWORD not in changes


async def test_wrong_current_password(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(
        URL,
        json={"current_password": "Not-The-One-1", "new_password": OTHER_PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_CREDENTIALS"
    assert (await client.get(ME, headers=account.headers)).status_code == 200
    assert (await login(client, account.email, STRONG_PASSWORD)).status_code == 200


async def test_new_password_policy(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(
        URL, json={"current_password": STRONG_PASSWORD, "new_password": "welcome"}, headers=account.headers
    )
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert {d["field"] for d in details} == {"body.new_password"}
    assert {d["rule"] for d in details} == {"min_length", "uppercase", "digit", "symbol", "common"}
    assert (await client.get(ME, headers=account.headers)).status_code == 200


async def test_guessing_the_current_password_is_throttled(make_client: Callable[..., Any]) -> None:
    c = await make_client(login_max_failures=2, login_failure_window_seconds=600)
    account = await register(c)
    body = {"current_password": "Guess-Number-1", "new_password": OTHER_PASSWORD}
    statuses = [(await c.post(URL, json=body, headers=account.headers)).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]
    r = await c.post(URL, json=body, headers=account.headers)
    assert r.json()["error"]["code"] == "RATE_LIMITED" and int(r.headers["retry-after"]) > 0


async def test_api_key_may_not_change_the_password(client: httpx.AsyncClient) -> None:
    account = await register(client)
    key = (await client.post(f"{ME}/api-keys", json={"name": "k"}, headers=account.headers)).json()["data"][
        "key"
    ]
    body = {"current_password": STRONG_PASSWORD, "new_password": OTHER_PASSWORD}
    for headers in ({"X-API-Key": key}, bearer(key)):
        r = await client.post(URL, json=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    assert (await login(client, account.email, STRONG_PASSWORD)).status_code == 200


async def test_anonymous_and_validation(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, json={"current_password": "a", "new_password": "b"})
    assert r.status_code == 401
    account = await register(client)
    for body in (
        {"current_password": STRONG_PASSWORD},
        {"current_password": STRONG_PASSWORD + "\x00", "new_password": OTHER_PASSWORD},
        {"current_password": STRONG_PASSWORD, "new_password": "Other-\x00-Pass-1"},
        {"current_password": STRONG_PASSWORD, "new_password": OTHER_PASSWORD, "logout": True},
        {"current_password": "x" * 1_000_000, "new_password": OTHER_PASSWORD},
    ):
        r = await client.post(URL, json=body, headers=account.headers)
        assert r.status_code in (413, 422), body.keys()
    # a long, emoji-laden password is fine
    r = await client.post(
        URL,
        json={"current_password": STRONG_PASSWORD, "new_password": "🦄🐴 Pony-Unicorn 42 " + "ü" * 100},
        headers=account.headers,
    )
    assert r.status_code == 200

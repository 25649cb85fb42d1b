"""POST /auth/refresh, /auth/logout, /auth/logout-all (API.md §2): rotation, reuse, revocation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.auth.support import API, bearer, login, register, scalar
from tests.factories import make_account

pytestmark = pytest.mark.integration

REFRESH = f"{API}/auth/refresh"
ME = f"{API}/users/me"


async def _refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post(REFRESH, json={"refresh_token": token})


async def _me(client: httpx.AsyncClient, access: str) -> int:
    return (await client.get(ME, headers=bearer(access))).status_code


async def test_refresh_rotates(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    r = await _refresh(client, account.refresh_token)
    assert r.status_code == 200
    pair = r.json()["data"]
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert pair["refresh_token"] != account.refresh_token
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 1800
    assert await _me(client, pair["access_token"]) == 200
    # same session (family): no new session row, the old token is retired
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions") == 1
    assert await scalar(engine, "SELECT count(*) FROM refresh_tokens WHERE used_at IS NOT NULL") == 1
    # stored hashed only
    raw = pair["refresh_token"]
    assert (
        await scalar(engine, "SELECT count(*) FROM refresh_tokens WHERE token_hash = :t", t=raw.encode()) == 0
    )
    assert "." not in raw  # opaque, not a JWT
    # a chain of rotations keeps working
    r2 = await _refresh(client, pair["refresh_token"])
    assert r2.status_code == 200


async def test_reuse_revokes_the_whole_family(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    first = (await _refresh(client, account.refresh_token)).json()["data"]
    second = (await _refresh(client, first["refresh_token"])).json()["data"]
    assert await _me(client, second["access_token"]) == 200

    # the stolen, retired first token is replayed
    r = await _refresh(client, account.refresh_token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"
    assert await scalar(engine, "SELECT revoke_reason FROM auth_sessions") == "reuse"
    # every token descended from that login is dead, access tokens included
    for access in (account.access_token, first["access_token"], second["access_token"]):
        assert await _me(client, access) == 401
    assert (await _refresh(client, second["refresh_token"])).status_code == 401


async def test_reuse_leaves_other_sessions_alone(client: httpx.AsyncClient) -> None:
    account = await register(client)
    other = (await login(client, account.email, account.password)).json()["data"]
    await _refresh(client, account.refresh_token)
    assert (await _refresh(client, account.refresh_token)).status_code == 401
    assert await _me(client, other["access_token"]) == 200
    assert (await _refresh(client, other["refresh_token"])).status_code == 200


async def test_parallel_refresh_with_one_token_has_at_most_one_winner(
    make_client: Callable[..., Any],
) -> None:
    c = await make_client(own_engine=True)
    account = await register(c)
    responses = await asyncio.gather(*(_refresh(c, account.refresh_token) for _ in range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [401] * 9
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 401} == {"INVALID_REFRESH_TOKEN"}
    # the losers presented a retired token: theft is assumed and the family is ended
    winner = next(r for r in responses if r.status_code == 200).json()["data"]
    assert (await _refresh(c, winner["refresh_token"])).status_code == 401


async def test_refresh_token_expiry(make_client: Callable[..., Any]) -> None:
    c = await make_client(refresh_token_expire_days=2)
    account = await register(c)
    clock.advance(timedelta(days=2, seconds=1))
    r = await _refresh(c, account.refresh_token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"


async def test_refresh_validation_and_unknown_tokens(client: httpx.AsyncClient) -> None:
    for token in ("unknown-token", "x" * 512):
        r = await _refresh(client, token)
        assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"
    for body in (
        {},
        {"refresh_token": ""},
        {"refresh_token": "a\x00b"},
        {"refresh_token": "x" * 513},
        {"refresh_token": "t", "extra": 1},
        {"refresh_token": "🦄" * 1_000_000},
    ):
        r = await client.post(REFRESH, json=body)
        assert r.status_code in (413, 422), body.keys()


async def test_access_token_is_not_a_refresh_token(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await _refresh(client, account.access_token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"


async def test_logout_kills_that_session_at_once(client: httpx.AsyncClient) -> None:
    account = await register(client)
    other = (await login(client, account.email, account.password)).json()["data"]
    r = await client.post(f"{API}/auth/logout", json={"refresh_token": account.refresh_token})
    assert r.status_code == 204 and r.content == b""
    assert await _me(client, account.access_token) == 401
    assert (await _refresh(client, account.refresh_token)).status_code == 401
    # the other login is untouched
    assert await _me(client, other["access_token"]) == 200


async def test_logout_of_unknown_or_revoked_tokens_is_204(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for _ in range(2):
        r = await client.post(f"{API}/auth/logout", json={"refresh_token": account.refresh_token})
        assert r.status_code == 204
    r = await client.post(f"{API}/auth/logout", json={"refresh_token": "never-issued"})
    assert r.status_code == 204
    r = await client.post(f"{API}/auth/logout", json={"refresh_token": "a\x00"})
    assert r.status_code == 422


async def test_logout_all(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    second = (await login(client, account.email, account.password)).json()["data"]
    bystander = await register(client)
    r = await client.post(f"{API}/auth/logout-all", headers=account.headers)
    assert r.status_code == 204 and r.content == b""
    for access in (account.access_token, second["access_token"]):
        assert await _me(client, access) == 401
    for refresh in (account.refresh_token, second["refresh_token"]):
        assert (await _refresh(client, refresh)).status_code == 401
    assert await _me(client, bystander.access_token) == 200
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions WHERE revoked_at IS NULL") == 1


async def test_logout_all_needs_an_access_token(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    r = await client.post(f"{API}/auth/logout-all")
    assert r.status_code == 401 and r.json()["error"]["code"] == "NOT_AUTHENTICATED"
    account = await make_account(engine)
    key = (await client.post(f"{API}/users/me/api-keys", json={"name": "k"}, headers=account.headers)).json()
    for headers in ({"X-API-Key": key["data"]["key"]}, bearer(key["data"]["key"])):
        r = await client.post(f"{API}/auth/logout-all", headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    assert await _me(client, account.access_token) == 200

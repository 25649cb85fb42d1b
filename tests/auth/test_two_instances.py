"""Logout on one app instance ends the session on every other instance at once.

Two app instances (each its own FastAPI app and engine, as two workers or two hosts would be)
share one database. Nothing about a session may be remembered per instance: an access token is
checked against its session row on every request, so a logout or logout-all made through one
instance must turn the same token into 401 INVALID_TOKEN on the other on its very next request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.auth.support import API, bearer, login, register

pytestmark = pytest.mark.integration


async def _instances(make_client: Callable[..., Any]) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    a: httpx.AsyncClient = await make_client(own_engine=True)
    b: httpx.AsyncClient = await make_client(own_engine=True)
    assert a.app is not b.app  # type: ignore[attr-defined]
    return a, b


async def _pair(client: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    r = await login(client, email, password)
    assert r.status_code == 200, r.text
    pair: dict[str, Any] = r.json()["data"]
    return pair


async def _me(client: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await client.get(f"{API}/users/me", headers=bearer(access_token))


def _refused_access(r: httpx.Response) -> bool:
    return r.status_code == 401 and r.json()["error"]["code"] == "INVALID_TOKEN"


def _refused_refresh(r: httpx.Response) -> bool:
    return r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"


async def test_logout_on_one_instance_ends_the_session_on_the_other(
    make_client: Callable[..., Any],
) -> None:
    a, b = await _instances(make_client)
    account = await register(a)
    pair = await _pair(a, account.email, account.password)
    assert (await _me(b, pair["access_token"])).status_code == 200  # B has seen and accepted it

    r = await a.post(f"{API}/auth/logout", json={"refresh_token": pair["refresh_token"]})
    assert r.status_code == 204

    assert _refused_access(await _me(b, pair["access_token"]))
    assert _refused_refresh(
        await b.post(f"{API}/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    )
    assert _refused_access(await _me(a, pair["access_token"]))
    # the registration's own session was not part of that login and lives on, on both
    assert (await _me(a, account.access_token)).status_code == 200
    assert (await _me(b, account.access_token)).status_code == 200


async def test_a_rotated_pair_is_ended_everywhere_by_logout(make_client: Callable[..., Any]) -> None:
    """Refresh on B, log out on A with the new refresh token: the whole family dies on both."""
    a, b = await _instances(make_client)
    account = await register(a)
    first = await _pair(a, account.email, account.password)
    r = await b.post(f"{API}/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200
    second = r.json()["data"]
    assert (await _me(a, second["access_token"])).status_code == 200

    assert (
        await a.post(f"{API}/auth/logout", json={"refresh_token": second["refresh_token"]})
    ).status_code == 204

    for client in (a, b):
        for token in (first["access_token"], second["access_token"]):
            assert _refused_access(await _me(client, token))
    assert _refused_refresh(
        await b.post(f"{API}/auth/refresh", json={"refresh_token": second["refresh_token"]})
    )


async def test_logout_all_on_one_instance_ends_sessions_used_on_the_other(
    make_client: Callable[..., Any],
) -> None:
    a, b = await _instances(make_client)
    account = await register(a)
    other = await register(a)
    on_a = [await _pair(a, account.email, account.password) for _ in range(2)]
    for pair in on_a:
        assert (await _me(a, pair["access_token"])).status_code == 200
    on_b = await _pair(b, account.email, account.password)

    r = await b.post(f"{API}/auth/logout-all", headers=bearer(on_b["access_token"]))
    assert r.status_code == 204

    for pair in [*on_a, on_b]:
        assert _refused_access(await _me(a, pair["access_token"]))
        assert _refused_access(await _me(b, pair["access_token"]))
        assert _refused_refresh(
            await a.post(f"{API}/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        )
    assert _refused_access(await _me(a, account.access_token))  # the registration's session too
    # another user's sessions are untouched, on either instance
    assert (await _me(a, other.access_token)).status_code == 200
    assert (await _me(b, other.access_token)).status_code == 200
    # and the account can log in again through either instance
    assert (
        await _me(a, (await _pair(b, account.email, account.password))["access_token"])
    ).status_code == 200

"""Security headers on every response (issue 12, lower list): nosniff, no referrer, no framing,
no-store on the API's answers (credential responses first of all), HSTS in production."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.auth.support import API, register

pytestmark = pytest.mark.integration


def _common(r: httpx.Response) -> None:
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"


async def test_credential_responses_are_never_stored(client: httpx.AsyncClient) -> None:
    account = await register(client)
    responses = [
        await client.post(f"{API}/auth/login", json={"email": account.email, "password": account.password}),
        await client.post(
            f"{API}/auth/token", data={"username": account.email, "password": account.password}
        ),
        await client.post(f"{API}/auth/refresh", json={"refresh_token": account.refresh_token}),
        await client.post(f"{API}/users/me/api-keys", json={"name": "k"}, headers=account.headers),
        await client.get(f"{API}/users/me", headers=account.headers),
        await client.post(f"{API}/auth/login", json={"email": account.email, "password": "Wrong-Pass-1!"}),
        await client.get(f"{API}/nowhere"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 201, 200, 401, 404]
    for r in responses:
        _common(r)
        assert r.headers["cache-control"] == "no-store"
        assert "strict-transport-security" not in r.headers  # not in development/test


async def test_every_response_has_the_common_headers(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/metrics", "/openapi.json"):
        r = await client.get(path)
        assert r.status_code == 200
        _common(r)
    too_big = await client.post(f"{API}/auth/login", content=b"x" * (1024 * 1024 + 1))
    assert too_big.status_code == 413
    _common(too_big)
    # a route's own Cache-Control is kept (not duplicated)
    account = await register(client)
    export = await client.get(f"{API}/usage/export", headers=account.headers)
    assert export.headers.get_list("cache-control") == ["no-store"]
    assert export.headers.get_list("x-content-type-options") == ["nosniff"]


async def test_production_adds_hsts(make_client: Callable[..., Any]) -> None:
    prod: httpx.AsyncClient = await make_client(environment="production", email_backend="smtp")
    r = await prod.get("/health")
    assert r.headers["strict-transport-security"].startswith("max-age=")
    _common(r)

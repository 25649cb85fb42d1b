"""GET/PATCH /users/me (API.md §3)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.auth.support import API, register, scalar
from tests.factories import make_account

pytestmark = pytest.mark.integration

ME = f"{API}/users/me"


async def _api_key(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    r = await client.post(f"{ME}/api-keys", json={"name": "script"}, headers=headers)
    assert r.status_code == 201
    return str(r.json()["data"]["key"])


async def test_get_me(client: httpx.AsyncClient) -> None:
    account = await register(client, name="Ada")
    r = await client.get(ME, headers=account.headers)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    assert body["data"] == account.body["data"]["user"]
    assert "password_hash" not in r.text and "last_login_at" not in body["data"]


async def test_get_me_with_an_api_key_in_both_header_forms(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    account = await make_account(engine)
    key = await _api_key(client, account.headers)
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        r = await client.get(ME, headers=headers)
        assert r.status_code == 200 and r.json()["data"]["id"] == str(account.user_id)


async def test_anonymous(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PATCH"):
        r = await client.request(method, ME, json={"name": "x"} if method == "PATCH" else None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "NOT_AUTHENTICATED"


async def test_patch_name(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client, name="Old Name")
    before = account.body["data"]["user"]["updated_at"]
    clock.advance(timedelta(seconds=5))
    r = await client.patch(ME, json={"name": "  New Name 🦄  "}, headers=account.headers)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["name"] == "New Name 🦄" and data["updated_at"] != before
    assert await scalar(engine, "SELECT name FROM users") == "New Name 🦄"
    # an empty PATCH changes nothing
    r = await client.patch(ME, json={}, headers=account.headers)
    assert r.status_code == 200 and r.json()["data"]["name"] == "New Name 🦄"


async def test_patch_with_an_api_key(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    key = await _api_key(client, account.headers)
    r = await client.patch(ME, json={"name": "Scripted"}, headers={"X-API-Key": key})
    assert r.status_code == 200 and r.json()["data"]["name"] == "Scripted"


@pytest.mark.parametrize(
    "body",
    [
        {"name": None},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 101},
        {"name": "nul\x00byte"},
        {"name": "new\nline"},
        {"name": "x" * 1_000_000},
        {"email": "other@example.com"},
        {"role": "admin"},
        {"is_active": False},
        {"name": 42},
    ],
)
async def test_patch_validation(client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any]) -> None:
    account = await make_account(engine, name="Unchanged")
    r = await client.patch(ME, json=body, headers=account.headers)
    assert r.status_code in (413, 422)
    assert r.json()["error"]["code"] in ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE")
    if r.status_code == 422:
        assert r.json()["error"]["details"][0]["field"] == f"body.{next(iter(body))}"
    assert await scalar(engine, "SELECT name || role FROM users") == "Unchangeduser"


async def test_huge_body(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    r = await client.patch(ME, json={"name": "x" * (1024 * 1024 + 1)}, headers=account.headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

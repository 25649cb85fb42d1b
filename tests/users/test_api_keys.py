"""/users/me/api-keys (API.md §2-§3): shown once, hashed at rest, limit 20, revocation at once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.auth.support import API, bearer, login, scalar
from tests.factories import Account, make_account

pytestmark = pytest.mark.integration

KEYS = f"{API}/users/me/api-keys"
ME = f"{API}/users/me"


async def _create(client: httpx.AsyncClient, account: Account, **body: Any) -> httpx.Response:
    return await client.post(KEYS, json={"name": "key", **body}, headers=account.headers)


async def test_create_shows_the_key_once(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    r = await _create(client, account, name=" CI deploy 🚀 ")
    assert r.status_code == 201
    data = r.json()["data"]
    assert set(data) == {
        "id",
        "name",
        "key_prefix",
        "is_active",
        "created_at",
        "last_used_at",
        "expires_at",
        "requests_per_minute",  # API.md §4.1
        "key",
    }
    key = data["key"]
    assert key.startswith("jfui_") and len(key) >= 5 + 32
    assert all(c.isalnum() or c in "-_" for c in key[5:])
    assert data["key_prefix"] == key[:12]
    assert data["name"] == "CI deploy 🚀" and data["is_active"] is True
    assert data["last_used_at"] is None and data["expires_at"] is None
    # only the SHA-256 is stored
    stored = await scalar(engine, "SELECT encode(key_hash, 'hex') FROM api_keys")
    import hashlib

    assert stored == hashlib.sha256(key.encode()).hexdigest()
    assert (
        await scalar(
            engine, "SELECT count(*) FROM api_keys WHERE position(:k in row(api_keys.*)::text) > 0", k=key
        )
        == 0
    )
    # never shown again
    listed = await client.get(KEYS, headers=account.headers)
    assert key not in listed.text and "key" not in listed.json()["data"][0]


async def test_list_newest_first_with_pagination(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    other = await make_account(engine)
    ids = []
    for i in range(3):
        ids.append((await _create(client, account, name=f"k{i}")).json()["data"]["id"])
        clock.advance(timedelta(seconds=1))
    await _create(client, other, name="not mine")
    r = await client.get(KEYS, headers=account.headers)
    assert r.status_code == 200
    assert [k["id"] for k in r.json()["data"]] == ids[::-1]
    assert r.json()["meta"]["pagination"] == {"offset": 0, "limit": 20, "total": 3}
    r = await client.get(KEYS, params={"offset": 1, "limit": 1}, headers=account.headers)
    assert [k["id"] for k in r.json()["data"]] == [ids[1]]
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}):
        assert (await client.get(KEYS, params=params, headers=account.headers)).status_code == 422


async def test_key_authenticates_in_both_forms_and_touches_last_used(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    account = await make_account(engine)
    key = (await _create(client, account)).json()["data"]["key"]
    assert (await client.get(ME, headers={"X-API-Key": key})).status_code == 200
    first = await scalar(engine, "SELECT last_used_at FROM api_keys")
    assert first is not None
    # within a minute: no new write
    clock.advance(timedelta(seconds=30))
    assert (await client.get(ME, headers=bearer(key))).status_code == 200
    assert await scalar(engine, "SELECT last_used_at FROM api_keys") == first
    clock.advance(timedelta(seconds=31))
    assert (await client.get(ME, headers=bearer(key))).status_code == 200
    assert await scalar(engine, "SELECT last_used_at FROM api_keys") > first
    listed = (await client.get(KEYS, headers=account.headers)).json()["data"][0]
    assert listed["last_used_at"] is not None


@pytest.mark.parametrize(
    "key", ["jfui_", "jfui_" + "x" * 43, "jfui_" + "x" * 500, "jfui_🦄".encode(), "sk_live_whatever"]
)
async def test_unknown_keys(client: httpx.AsyncClient, key: str | bytes) -> None:
    raw = key if isinstance(key, bytes) else key.encode()
    for headers in ({b"X-API-Key": raw}, {b"Authorization": b"Bearer " + raw}):
        r = await client.get(ME, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_TOKEN"


async def test_revoke_stops_the_key_at_once(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    data = (await _create(client, account)).json()["data"]
    assert (await client.get(ME, headers={"X-API-Key": data["key"]})).status_code == 200
    r = await client.delete(f"{KEYS}/{data['id']}", headers=account.headers)
    assert r.status_code == 204 and r.content == b""
    r = await client.get(ME, headers={"X-API-Key": data["key"]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_TOKEN"
    listed = (await client.get(KEYS, headers=account.headers)).json()["data"]
    assert listed[0]["id"] == data["id"] and listed[0]["is_active"] is False
    assert await scalar(engine, "SELECT revoked_at IS NOT NULL FROM api_keys") is True
    # revoking again is harmless
    assert (await client.delete(f"{KEYS}/{data['id']}", headers=account.headers)).status_code == 204


async def test_another_users_key_is_404(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    owner = await make_account(engine)
    intruder = await make_account(engine)
    data = (await _create(client, owner)).json()["data"]
    r = await client.delete(f"{KEYS}/{data['id']}", headers=intruder.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    assert (await client.get(ME, headers={"X-API-Key": data["key"]})).status_code == 200
    r = await client.delete(f"{KEYS}/{uuid.uuid4()}", headers=owner.headers)
    assert r.status_code == 404
    r = await client.delete(f"{KEYS}/not-a-uuid", headers=owner.headers)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "path.key_id"


async def test_api_keys_cannot_manage_credentials(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    data = (await _create(client, account)).json()["data"]
    for headers in ({"X-API-Key": data["key"]}, bearer(data["key"])):
        for method, url, body in (
            ("GET", KEYS, None),
            ("POST", KEYS, {"name": "more"}),
            ("DELETE", f"{KEYS}/{data['id']}", None),
        ):
            r = await client.request(method, url, json=body, headers=headers)
            assert r.status_code == 403, (method, url)
            assert r.json()["error"]["code"] == "FORBIDDEN"
    assert await scalar(engine, "SELECT count(*) FROM api_keys WHERE is_active") == 1


async def test_anonymous(client: httpx.AsyncClient) -> None:
    for method, url in (("GET", KEYS), ("POST", KEYS), ("DELETE", f"{KEYS}/{uuid.uuid4()}")):
        r = await client.request(method, url, json={"name": "x"} if method == "POST" else None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "NOT_AUTHENTICATED"


async def test_expiry(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    expires = (utcnow() + timedelta(days=1)).replace(microsecond=0)
    r = await _create(client, account, expires_at=expires.isoformat())
    assert r.status_code == 201
    data = r.json()["data"]
    assert datetime.fromisoformat(data["expires_at"].replace("Z", "+00:00")) == expires
    assert (await client.get(ME, headers={"X-API-Key": data["key"]})).status_code == 200
    clock.advance(timedelta(days=1, seconds=1))
    assert (await client.get(ME, headers={"X-API-Key": data["key"]})).status_code == 401
    fresh = (await login(client, account.email, account.password)).json()["data"]["access_token"]
    assert (await client.get(KEYS, headers=bearer(fresh))).json()["data"][0]["is_active"] is False


@pytest.mark.parametrize(
    "expires_at",
    [
        "2001-01-01T00:00:00+00:00",  # past
        "2999-01-01T00:00:00",  # no offset
        "tomorrow",
        "",
    ],
)
async def test_expiry_validation(client: httpx.AsyncClient, engine: AsyncEngine, expires_at: str) -> None:
    account = await make_account(engine)
    r = await _create(client, account, expires_at=expires_at)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.expires_at"


async def test_expiry_in_another_offset(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    r = await _create(client, account, expires_at="2999-06-01T12:00:00+02:00")
    assert r.status_code == 201
    got = datetime.fromisoformat(r.json()["data"]["expires_at"].replace("Z", "+00:00"))
    assert got == datetime(2999, 6, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "   "},
        {"name": "n\x00"},
        {"name": "x" * 101},
        {"name": "x" * 1_000_000},
        {"name": "ok", "is_active": False},
        {"name": "ok", "key": "jfui_mine"},
    ],
)
async def test_create_validation(
    client: httpx.AsyncClient, engine: AsyncEngine, body: dict[str, Any]
) -> None:
    account = await make_account(engine)
    r = await client.post(KEYS, json=body, headers=account.headers)
    assert r.status_code in (413, 422)
    assert await scalar(engine, "SELECT count(*) FROM api_keys") == 0


async def test_at_most_twenty_active_keys(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    created = [(await _create(client, account, name=f"k{i}")).json()["data"] for i in range(20)]
    r = await _create(client, account, name="one too many")
    assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
    # revoking one frees a slot
    await client.delete(f"{KEYS}/{created[0]['id']}", headers=account.headers)
    assert (await _create(client, account, name="replacement")).status_code == 201
    assert (await _create(client, account, name="again too many")).status_code == 409
    # another user is not affected
    other = await make_account(engine)
    assert (await _create(client, other)).status_code == 201


async def test_expired_keys_do_not_count(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    soon = (utcnow() + timedelta(minutes=10)).isoformat()
    for i in range(20):
        assert (await _create(client, account, name=f"k{i}", expires_at=soon)).status_code == 201
    assert (await _create(client, account)).status_code == 409
    clock.advance(timedelta(minutes=20))  # the keys expired; the account's access token has not
    assert (await _create(client, account)).status_code == 201


async def test_limit_holds_under_parallel_creation(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await make_account(engine)
    for i in range(17):
        assert (await _create(client, account, name=f"k{i}")).status_code == 201
    responses = await asyncio.gather(*(_create(client, account, name=f"p{i}") for i in range(8)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [409] * 5
    assert await scalar(engine, "SELECT count(*) FROM api_keys WHERE is_active") == 20

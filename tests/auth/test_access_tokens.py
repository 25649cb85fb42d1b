"""Access tokens and API keys at the door (API.md §2): what is refused, and that it is refused at once."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from tests.auth.support import API, bearer, execute, register
from tests.conftest import TEST_SECRET

pytestmark = pytest.mark.integration

ME = f"{API}/users/me"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def _status(client: httpx.AsyncClient, token: str) -> tuple[int, str]:
    r = await client.get(ME, headers=bearer(token))
    code = r.json()["error"]["code"] if r.status_code != 200 else "OK"
    return r.status_code, code


async def test_no_credentials(client: httpx.AsyncClient) -> None:
    r = await client.get(ME)
    assert r.status_code == 401 and r.json()["error"]["code"] == "NOT_AUTHENTICATED"
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token abc"):
        r = await client.get(ME, headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["error"]["code"] in ("INVALID_TOKEN", "NOT_AUTHENTICATED")


async def test_valid_token_claims(client: httpx.AsyncClient) -> None:
    account = await register(client)
    claims = _claims(account.access_token)
    assert jwt.get_unverified_header(account.access_token)["alg"] == "HS256"
    assert {"sub", "role", "sid", "jti", "iat", "exp", "type"} <= set(claims)
    assert claims["type"] == "access" and claims["sub"] == account.user_id and claims["role"] == "user"
    assert claims["exp"] - claims["iat"] == 1800


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_forged_tokens_are_refused(client: httpx.AsyncClient) -> None:
    account = await register(client)
    claims = _claims(account.access_token)
    header, payload, signature = account.access_token.split(".")

    tampered_payload = _b64({**claims, "role": "admin"})
    forged = {
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "alg none no dot": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}",
        "HS512": jwt.encode(claims, TEST_SECRET, algorithm="HS512"),
        "wrong key": jwt.encode(claims, "another-secret-that-is-long-enough-0123456789", algorithm="HS256"),
        "garbage": "not.a.jwt",
        "random": uuid.uuid4().hex,
    }
    for name, token in forged.items():
        assert await _status(client, token) == (401, "INVALID_TOKEN"), name
    assert await _status(client, account.access_token) == (200, "OK")


@pytest.mark.parametrize("missing", ["sub", "sid", "jti", "iat", "exp", "type", "role"])
async def test_missing_claims_are_refused(client: httpx.AsyncClient, missing: str) -> None:
    account = await register(client)
    claims = _claims(account.access_token)
    claims.pop(missing)
    token = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    assert await _status(client, token) == (401, "INVALID_TOKEN")


@pytest.mark.parametrize(
    "change",
    [
        {"type": "refresh"},
        {"sub": "not-a-uuid"},
        {"sid": str(uuid.uuid4())},
        {"sub": str(uuid.uuid4())},
    ],
)
async def test_wrong_claims_are_refused(client: httpx.AsyncClient, change: dict[str, str]) -> None:
    account = await register(client)
    token = jwt.encode({**_claims(account.access_token), **change}, TEST_SECRET, algorithm="HS256")
    assert await _status(client, token) == (401, "INVALID_TOKEN")


async def test_expired_token(client: httpx.AsyncClient) -> None:
    account = await register(client)
    clock.advance(timedelta(minutes=29, seconds=50))  # margin for a slow machine (exp is whole seconds)
    assert await _status(client, account.access_token) == (200, "OK")
    clock.advance(timedelta(seconds=11))
    assert await _status(client, account.access_token) == (401, "INVALID_TOKEN")
    now = int(utcnow().timestamp())
    expired = jwt.encode(
        {**_claims(account.access_token), "iat": now - 100, "exp": now - 1}, TEST_SECRET, algorithm="HS256"
    )
    assert await _status(client, expired) == (401, "INVALID_TOKEN")


async def test_refresh_token_is_not_an_access_token(client: httpx.AsyncClient) -> None:
    account = await register(client)
    assert await _status(client, account.refresh_token) == (401, "INVALID_TOKEN")


async def test_role_comes_from_the_database(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    await execute(engine, "UPDATE users SET role = 'admin' WHERE id = :id", id=account.user_id)
    me = await client.get(ME, headers=account.headers)
    assert me.json()["data"]["role"] == "admin"  # the token still says "user"


async def test_disabled_user_tokens_and_keys_die_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    account = await register(client)
    r = await client.post(f"{API}/users/me/api-keys", json={"name": "ci"}, headers=account.headers)
    key = r.json()["data"]["key"]
    assert (await client.get(ME, headers={"X-API-Key": key})).status_code == 200
    await execute(engine, "UPDATE users SET is_active = false WHERE id = :id", id=account.user_id)
    assert await _status(client, account.access_token) == (401, "INVALID_TOKEN")
    for headers in ({"X-API-Key": key}, bearer(key)):
        r = await client.get(ME, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_TOKEN"
    r = await client.post(f"{API}/auth/refresh", json={"refresh_token": account.refresh_token})
    assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_REFRESH_TOKEN"
    # and back: re-enabled, the same credentials work again (nothing was deleted)
    await execute(engine, "UPDATE users SET is_active = true WHERE id = :id", id=account.user_id)
    assert await _status(client, account.access_token) == (200, "OK")


async def test_openapi_declares_both_security_schemes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    bearer_scheme = next(s for s in schemes.values() if s["type"] == "oauth2")
    assert bearer_scheme["flows"]["password"]["tokenUrl"] == "/api/v1/auth/token"
    assert any(s["type"] == "apiKey" and s["name"] == "X-API-Key" for s in schemes.values())
    me = spec["paths"]["/api/v1/users/me"]["get"]
    assert {name for entry in me["security"] for name in entry} == set(schemes)
    assert "security" not in spec["paths"]["/api/v1/auth/login"]["post"]

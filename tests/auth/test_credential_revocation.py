"""API keys do not outlive account recovery (issue 12, item 2): a password reset revokes every
API key and says so in its email, logout-all revokes them when asked, a password change keeps
them, and every revocation is audited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth.support import (
    API,
    OTHER_PASSWORD,
    Registered,
    SmtpServer,
    bearer,
    issue_reset_token,
    register,
    scalar,
    smtp_server,
)

pytestmark = pytest.mark.integration

KEYS = f"{API}/users/me/api-keys"
LOGOUT_ALL = f"{API}/auth/logout-all"


async def _keys(client: httpx.AsyncClient, account: Registered, n: int = 2) -> list[str]:
    made = [await client.post(KEYS, json={"name": f"k{i}"}, headers=account.headers) for i in range(n)]
    assert all(r.status_code == 201 for r in made)
    return [r.json()["data"]["key"] for r in made]


async def _works(client: httpx.AsyncClient, credential: str) -> bool:
    r = await client.get(f"{API}/users/me", headers=bearer(credential))
    return r.status_code == 200


async def _revocations(engine: AsyncEngine, reason: str) -> int:
    return int(
        await scalar(
            engine,
            "SELECT count(*) FROM audit_logs WHERE action = 'user.api_key_revoke'"
            " AND changes->>'reason' = :reason",
            reason=reason,
        )
    )


@pytest.fixture
async def mailbox() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as smtp:
        yield smtp


async def test_a_password_reset_revokes_every_api_key_and_says_so(
    make_client: Callable[..., Any], engine: AsyncEngine, mailbox: SmtpServer
) -> None:
    c: httpx.AsyncClient = await make_client(
        email_backend="smtp", smtp_host="127.0.0.1", smtp_port=mailbox.port
    )
    account = await register(c)
    bystander = await register(c)
    keys = await _keys(c, account)
    (other_key,) = await _keys(c, bystander, 1)
    assert (await c.post(f"{API}/auth/password-reset", json={"email": account.email})).status_code == 202
    body = next(b for b in mailbox.bodies() if "reset" in b.lower() and "token=" in b)
    assert "revokes every" in body and "API key" in body
    token = body.split("token=", 1)[1].split()[0]
    r = await c.post(
        f"{API}/auth/password-reset/confirm", json={"token": token, "new_password": OTHER_PASSWORD}
    )
    assert r.status_code == 200
    assert [await _works(c, k) for k in keys] == [False, False]
    assert await _works(c, other_key)  # another user's key is untouched
    assert await _works(c, r.json()["data"]["access_token"])
    assert await _revocations(engine, "password_reset") == 2
    changes = await scalar(engine, "SELECT changes FROM audit_logs WHERE action = 'user.password_reset'")
    assert changes["api_keys_revoked"] == 2 and changes["sessions_revoked"] == 1
    listed = (await c.get(KEYS, headers=bearer(r.json()["data"]["access_token"]))).json()["data"]
    assert [k["is_active"] for k in listed] == [False, False]


async def test_a_password_change_keeps_api_keys(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    keys = await _keys(client, account)
    r = await client.post(
        f"{API}/users/me/password",
        json={"current_password": account.password, "new_password": OTHER_PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200
    assert [await _works(client, k) for k in keys] == [True, True]
    assert await scalar(engine, "SELECT count(*) FROM audit_logs WHERE action = 'user.api_key_revoke'") == 0


async def test_logout_all_keeps_keys_unless_asked(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    keys = await _keys(client, account)
    for body in (None, {}, {"include_api_keys": False}):
        fresh = await register(client)
        assert (await client.post(LOGOUT_ALL, json=body, headers=fresh.headers)).status_code == 204
    assert (await client.post(LOGOUT_ALL, headers=account.headers)).status_code == 204
    assert not await _works(client, account.access_token)
    assert [await _works(client, k) for k in keys] == [True, True]
    logged = await scalar(
        engine,
        "SELECT changes FROM audit_logs WHERE action = 'user.logout_all' AND actor_id = :u",
        u=account.user_id,
    )
    assert logged == {"sessions_revoked": 1, "api_keys_revoked": 0}


async def test_logout_all_with_api_keys(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    keys = await _keys(client, account, 3)
    bystander = await register(client)
    (other_key,) = await _keys(client, bystander, 1)
    r = await client.post(LOGOUT_ALL, json={"include_api_keys": True}, headers=account.headers)
    assert r.status_code == 204
    assert [await _works(client, k) for k in keys] == [False, False, False]
    assert not await _works(client, account.access_token)
    assert await _works(client, other_key) and await _works(client, bystander.access_token)
    assert await _revocations(engine, "logout_all") == 3
    # a repeat (nothing left to revoke) is harmless
    again = await register(client)
    assert (
        await client.post(LOGOUT_ALL, json={"include_api_keys": True}, headers=again.headers)
    ).status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        {"include_api_keys": "yes"},
        {"include_api_keys": None},
        {"include_api_keys": True, "everything": True},
        {"include_api_keys": [True]},
        ["include_api_keys"],
        "true",
    ],
)
async def test_logout_all_refuses_a_bad_body(client: httpx.AsyncClient, body: Any) -> None:
    account = await register(client)
    r = await client.post(LOGOUT_ALL, json=body, headers=account.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_ERROR")
    assert await _works(client, account.access_token)  # nothing revoked


async def test_logout_all_with_keys_in_parallel(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    account = await register(client)
    keys = await _keys(client, account, 4)
    second = (
        await client.post(f"{API}/auth/login", json={"email": account.email, "password": account.password})
    ).json()
    responses = await asyncio.gather(
        *(
            client.post(LOGOUT_ALL, json={"include_api_keys": True}, headers=h)
            for h in (account.headers, bearer(second["data"]["access_token"]))
        )
    )
    assert all(r.status_code in (204, 401) for r in responses)
    assert [await _works(client, k) for k in keys] == [False] * 4
    assert await _revocations(engine, "logout_all") == 4  # each key revoked (and audited) once


async def test_confirm_via_a_token_revokes_keys_without_email(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    account = await register(client)
    keys = await _keys(client, account)
    token = await issue_reset_token(engine, account.user_id)
    r = await client.post(
        f"{API}/auth/password-reset/confirm", json={"token": token, "new_password": OTHER_PASSWORD}
    )
    assert r.status_code == 200
    assert [await _works(client, k) for k in keys] == [False, False]

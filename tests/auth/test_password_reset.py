"""POST /auth/password-reset and /confirm (API.md §2): email, single use, expiry, only-newest, limits."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock
from tests.auth.support import (
    API,
    OTHER_PASSWORD,
    SmtpServer,
    bearer,
    execute,
    free_port,
    login,
    register,
    scalar,
    smtp_server,
    unique_email,
)

pytestmark = pytest.mark.integration

RESET = f"{API}/auth/password-reset"
CONFIRM = f"{API}/auth/password-reset/confirm"
TOKEN_IN_LINK = re.compile(r"reset-password\?token=([A-Za-z0-9_-]+)")


@pytest.fixture
async def mailbox() -> AsyncIterator[SmtpServer]:
    """The reset emails of this module go to a real SMTP server (the console backend redacts
    the token, so the link can only be read from a real mailbox)."""
    async with smtp_server() as smtp:
        yield smtp


@pytest.fixture
def make_client(make_client: Callable[..., Any], mailbox: SmtpServer) -> Callable[..., Any]:
    async def factory(**overrides: Any) -> httpx.AsyncClient:
        smtp = {"email_backend": "smtp", "smtp_host": "127.0.0.1", "smtp_port": mailbox.port}
        client: httpx.AsyncClient = await make_client(**{**smtp, **overrides})
        return client

    return factory


def _tokens(mailbox: SmtpServer) -> list[str]:
    found: list[str] = []
    for body in mailbox.bodies():
        found += TOKEN_IN_LINK.findall(body)
    return found


async def _request_token(client: httpx.AsyncClient, mailbox: SmtpServer, email: str) -> str:
    before = len(_tokens(mailbox))
    r = await client.post(RESET, json={"email": email})
    assert r.status_code == 202
    tokens = _tokens(mailbox)
    assert len(tokens) == before + 1
    return tokens[-1]


async def test_known_and_unknown_emails_get_the_same_answer(
    client: httpx.AsyncClient, mailbox: SmtpServer, engine: AsyncEngine
) -> None:
    account = await register(client)
    known = await client.post(RESET, json={"email": account.email.upper()})
    unknown = await client.post(RESET, json={"email": unique_email()})
    assert known.status_code == unknown.status_code == 202
    assert known.json()["data"] == unknown.json()["data"]
    assert set(known.json()["data"]) == {"message"}
    assert len(_tokens(mailbox)) == 1
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens") == 1


async def test_confirm_sets_password_revokes_sessions_and_logs_in(
    client: httpx.AsyncClient, mailbox: SmtpServer, engine: AsyncEngine
) -> None:
    account = await register(client)
    second = (await login(client, account.email, account.password)).json()["data"]
    token = await _request_token(client, mailbox, account.email)
    # stored hashed only
    assert (
        await scalar(
            engine, "SELECT count(*) FROM password_reset_tokens WHERE token_hash = :t", t=token.encode()
        )
        == 0
    )

    r = await client.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    assert r.status_code == 200
    pair = r.json()["data"]
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert (await client.get(f"{API}/users/me", headers=bearer(pair["access_token"]))).status_code == 200
    # every earlier session is over
    for access in (account.access_token, second["access_token"]):
        assert (await client.get(f"{API}/users/me", headers=bearer(access))).status_code == 401
    r = await client.post(f"{API}/auth/refresh", json={"refresh_token": account.refresh_token})
    assert r.status_code == 401
    # the new password works, the old one does not
    assert (await login(client, account.email, account.password)).status_code == 401
    assert (await login(client, account.email, OTHER_PASSWORD)).status_code == 200
    assert await scalar(engine, "SELECT count(*) FROM audit_logs WHERE action = 'user.password_reset'") == 1


async def test_token_is_single_use(client: httpx.AsyncClient, mailbox: SmtpServer) -> None:
    account = await register(client)
    token = await _request_token(client, mailbox, account.email)
    assert (
        await client.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    ).status_code == 200
    r = await client.post(CONFIRM, json={"token": token, "new_password": "Third-Password-99"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_RESET_TOKEN"


async def test_parallel_confirms_have_one_winner(
    make_client: Callable[..., Any], mailbox: SmtpServer
) -> None:
    c = await make_client(own_engine=True)
    account = await register(c)
    token = await _request_token(c, mailbox, account.email)
    responses = await asyncio.gather(
        *(c.post(CONFIRM, json={"token": token, "new_password": f"Parallel-Pw-{i}x!"}) for i in range(8))
    )
    assert sorted(r.status_code for r in responses) == [200] + [400] * 7


async def test_token_expires(make_client: Callable[..., Any], mailbox: SmtpServer) -> None:
    c = await make_client(password_reset_expire_hours=2)
    account = await register(c)
    token = await _request_token(c, mailbox, account.email)
    clock.advance(timedelta(hours=2, seconds=1))
    r = await c.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_RESET_TOKEN"


async def test_default_lifetime_is_24_hours(client: httpx.AsyncClient, mailbox: SmtpServer) -> None:
    account = await register(client)
    token = await _request_token(client, mailbox, account.email)
    clock.advance(timedelta(hours=23, minutes=59))
    assert (
        await client.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    ).status_code == 200


async def test_only_the_newest_token_works(client: httpx.AsyncClient, mailbox: SmtpServer) -> None:
    account = await register(client)
    old = await _request_token(client, mailbox, account.email)
    clock.advance(timedelta(seconds=1))
    new = await _request_token(client, mailbox, account.email)
    r = await client.post(CONFIRM, json={"token": old, "new_password": OTHER_PASSWORD})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_RESET_TOKEN"
    assert (
        await client.post(CONFIRM, json={"token": new, "new_password": OTHER_PASSWORD})
    ).status_code == 200


async def test_only_the_newest_even_if_an_older_one_escaped_retirement(
    client: httpx.AsyncClient, mailbox: SmtpServer, engine: AsyncEngine
) -> None:
    account = await register(client)
    old = await _request_token(client, mailbox, account.email)
    clock.advance(timedelta(seconds=1))
    await _request_token(client, mailbox, account.email)
    await execute(engine, "UPDATE password_reset_tokens SET used_at = NULL")
    r = await client.post(CONFIRM, json={"token": old, "new_password": OTHER_PASSWORD})
    assert r.status_code == 400


async def test_more_than_three_requests_an_hour_are_dropped_silently(
    client: httpx.AsyncClient, mailbox: SmtpServer
) -> None:
    account = await register(client)
    answers = [await client.post(RESET, json={"email": account.email}) for _ in range(5)]
    assert [r.status_code for r in answers] == [202] * 5
    assert len({str(r.json()["data"]) for r in answers}) == 1
    assert len(_tokens(mailbox)) == 3
    clock.advance(timedelta(hours=1, seconds=1))
    await _request_token(client, mailbox, account.email)


async def test_limit_follows_settings(make_client: Callable[..., Any], mailbox: SmtpServer) -> None:
    c = await make_client(password_reset_max_per_hour=1)
    account = await register(c)
    for _ in range(3):
        assert (await c.post(RESET, json={"email": account.email})).status_code == 202
    assert len(_tokens(mailbox)) == 1


async def test_disabled_account_gets_no_email(
    client: httpx.AsyncClient, mailbox: SmtpServer, engine: AsyncEngine
) -> None:
    account = await register(client)
    await execute(engine, "UPDATE users SET is_active = false")
    assert (await client.post(RESET, json={"email": account.email})).status_code == 202
    assert _tokens(mailbox) == []


async def test_confirm_for_an_account_disabled_meanwhile(
    client: httpx.AsyncClient, mailbox: SmtpServer, engine: AsyncEngine
) -> None:
    account = await register(client)
    token = await _request_token(client, mailbox, account.email)
    await execute(engine, "UPDATE users SET is_active = false")
    r = await client.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    assert r.status_code == 403 and r.json()["error"]["code"] == "ACCOUNT_DISABLED"


async def test_confirm_checks_the_policy_first_without_burning_the_token(
    client: httpx.AsyncClient, mailbox: SmtpServer
) -> None:
    account = await register(client)
    token = await _request_token(client, mailbox, account.email)
    r = await client.post(CONFIRM, json={"token": token, "new_password": "Password1!"})
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert [(d["field"], d["rule"]) for d in details] == [("body.new_password", "common")]
    assert (
        await client.post(CONFIRM, json={"token": token, "new_password": OTHER_PASSWORD})
    ).status_code == 200


async def test_bad_tokens_and_validation(client: httpx.AsyncClient) -> None:
    r = await client.post(CONFIRM, json={"token": "never-issued", "new_password": OTHER_PASSWORD})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_RESET_TOKEN"
    for body in (
        {"token": "t"},
        {"token": "t\x00", "new_password": OTHER_PASSWORD},
        {"token": "t", "new_password": "Other-\x00-Password-1"},
        {"token": "t", "new_password": OTHER_PASSWORD, "email": "x@example.com"},
        {"token": "t" * 1_000_000, "new_password": OTHER_PASSWORD},
    ):
        assert (await client.post(CONFIRM, json=body)).status_code in (413, 422)
    reset_bodies: list[dict[str, Any]] = [
        {"email": "nope"},
        {"email": "a\x00@example.com"},
        {},
        {"email": "a@example.com", "x": 1},
    ]
    for reset_body in reset_bodies:
        assert (await client.post(RESET, json=reset_body)).status_code == 422


async def test_reset_email_over_real_smtp(make_client: Callable[..., Any]) -> None:
    async with smtp_server() as smtp:
        c = await make_client(
            email_backend="smtp",
            smtp_host="127.0.0.1",
            smtp_port=smtp.port,
            smtp_from="Hub <hub@example.com>",
            password_reset_url="https://app.example.com/reset?t={token}&x=1",
        )
        account = await register(c)
        r = await c.post(RESET, json={"email": account.email})
        assert r.status_code == 202
        resets = [m for m in smtp.messages if "Reset" in m["Subject"]]
        assert len(resets) == 1
        assert resets[0]["To"] == account.email and resets[0]["From"] == "Hub <hub@example.com>"
        body = next(b for b in smtp.bodies() if "reset" in b.lower() and "?t=" in b)
        match = re.search(r"https://app\.example\.com/reset\?t=([A-Za-z0-9_-]+)&x=1", body)
        assert match, body
        assert smtp.inbox.envelopes[-1] == ("hub@example.com", [account.email])
        r = await c.post(CONFIRM, json={"token": match.group(1), "new_password": OTHER_PASSWORD})
        assert r.status_code == 200


async def test_failing_mail_server_never_fails_a_reset(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture, engine: AsyncEngine
) -> None:
    caplog.set_level(logging.WARNING, logger="joyhub.email")
    c = await make_client(email_backend="smtp", smtp_host="127.0.0.1", smtp_port=free_port())
    account = await register(c)
    r = await c.post(RESET, json={"email": account.email})
    assert r.status_code == 202
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens") == 1
    failures = [rec for rec in caplog.records if rec.getMessage() == "email delivery failed"]
    assert [f.email_kind for f in failures] == ["welcome", "password_reset"]  # type: ignore[attr-defined]

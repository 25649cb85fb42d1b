"""POST /auth/register (API.md §2): fields, policy, uniqueness under parallel registration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth.support import (
    API,
    STRONG_PASSWORD,
    bearer,
    free_port,
    login,
    register,
    scalar,
    smtp_server,
    unique_email,
)

pytestmark = pytest.mark.integration

URL = f"{API}/auth/register"


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "Grace Hopper", "email": unique_email(), "password": STRONG_PASSWORD}
    body.update(over)
    return body


async def test_register_returns_user_and_tokens(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    r = await client.post(URL, json=_body(name="  Grace Hopper  ", email="Grace.Hopper@Example.COM"))
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"data", "error", "meta"}
    assert body["error"] is None and body["meta"]["request_id"]
    user = body["data"]["user"]
    assert set(user) == {"id", "name", "email", "role", "is_active", "created_at", "updated_at"}
    assert user["name"] == "Grace Hopper"
    assert user["email"] == "grace.hopper@example.com"
    assert user["role"] == "user" and user["is_active"] is True
    assert user["created_at"].endswith(("Z", "+00:00"))
    tokens = body["data"]["tokens"]
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 30 * 60
    assert "password" not in r.text and STRONG_PASSWORD not in r.text

    me = await client.get(f"{API}/users/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200 and me.json()["data"]["id"] == user["id"]
    assert await scalar(engine, "SELECT count(*) FROM subscriptions") == 0
    stored = await scalar(engine, "SELECT password_hash FROM users WHERE id = :id", id=user["id"])
    assert stored.startswith("$2") and STRONG_PASSWORD not in stored
    assert await scalar(engine, "SELECT count(*) FROM auth_sessions WHERE user_id = :id", id=user["id"]) == 1


async def test_email_taken_case_insensitively(client: httpx.AsyncClient) -> None:
    email = unique_email()
    await register(client, email=email)
    r = await client.post(URL, json=_body(email=email.upper()))
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "EMAIL_TAKEN"


async def test_parallel_registration_of_one_email_has_one_winner(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    email = unique_email("race")
    responses = await asyncio.gather(
        *(client.post(URL, json=_body(email=email if i % 2 else email.upper())) for i in range(10))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 9
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"EMAIL_TAKEN"}
    assert await scalar(engine, "SELECT count(*) FROM users WHERE email = :e", e=email) == 1


@pytest.mark.parametrize(
    "extra",
    [{"role": "admin"}, {"is_active": False}, {"id": "00000000-0000-0000-0000-000000000000"}],
)
async def test_unknown_fields_are_rejected(client: httpx.AsyncClient, extra: dict[str, Any]) -> None:
    r = await client.post(URL, json=_body(**extra))
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert err["details"][0]["field"] == f"body.{next(iter(extra))}"


async def test_missing_fields_and_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, json={"email": unique_email()})
    assert r.status_code == 422
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert fields == {"body.name", "body.password"}
    r = await client.post(URL, content=b'{"name": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "MALFORMED_JSON"


@pytest.mark.parametrize(
    "email", ["not-an-email", "a@", "@example.com", "a b@example.com", "x" * 300 + "@e.com"]
)
async def test_invalid_email(client: httpx.AsyncClient, email: str) -> None:
    r = await client.post(URL, json=_body(email=email))
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.email"


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "line\nbreak", "tab\there"])
async def test_invalid_name(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post(URL, json=_body(name=name))
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.name"


async def test_name_bounds_and_emoji(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, json=_body(name="x" * 100))
    assert r.status_code == 201
    r = await client.post(URL, json=_body(name=" 🦄 Zoë 漢字 "))
    assert r.status_code == 201
    assert r.json()["data"]["user"]["name"] == "🦄 Zoë 漢字"


def _rules(r: httpx.Response, field: str = "body.password") -> set[str]:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "VALIDATION_ERROR"
    assert all(d["field"] == field and d["message"] for d in err["details"])
    return {d["rule"] for d in err["details"]}


@pytest.mark.parametrize(
    ("password", "rules"),
    [
        ("", {"min_length", "lowercase", "uppercase", "digit", "symbol"}),
        ("Ab1!", {"min_length"}),
        ("abcdefgh", {"uppercase", "digit", "symbol", "common"}),
        ("alllowercase1!", {"uppercase"}),
        ("ALLUPPERCASE1!", {"lowercase"}),
        ("NoDigitsHere!", {"digit"}),
        ("NoSymbols123x", {"symbol"}),
        ("Password1!", {"common"}),
        ("Welcome123!", {"common"}),
        ("Qwerty123!", {"common"}),
        ("Aa1!" + "x" * 125, {"max_length"}),
    ],
)
async def test_password_policy_names_every_unmet_rule(
    client: httpx.AsyncClient, password: str, rules: set[str]
) -> None:
    r = await client.post(URL, json=_body(password=password))
    assert _rules(r) == rules


async def test_password_edges_accepted(client: httpx.AsyncClient) -> None:
    for password in ("Aa1!" + "x" * 124, "Zq7#mK2p", "Ünïcødé-Pässw0rd", "Emoji-🦄-Pass-9"):
        r = await client.post(URL, json=_body(password=password))
        assert r.status_code == 201, (password, r.text)


async def test_no_silent_72_byte_truncation(client: httpx.AsyncClient) -> None:
    prefix = "Aa1!" + "x" * 70  # 74 bytes: the difference comes after byte 72
    account = await register(client, password=prefix + "-first")
    assert (await login(client, account.email, prefix + "-other")).status_code == 401
    assert (await login(client, account.email, prefix + "-first")).status_code == 200


async def test_nul_bytes_and_huge_strings(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    for field, value in (
        ("name", "Nul\x00Name"),
        ("email", "nul\x00@example.com"),
        ("password", "Tr1cky-\x00-Quokka"),
    ):
        r = await client.post(URL, json=_body(**{field: value}))
        assert r.status_code == 422, (field, r.text)
        assert r.json()["error"]["details"][0]["field"] == f"body.{field}"
    for field in ("name", "email", "password"):
        r = await client.post(URL, json=_body(**{field: "A1!a" * 250_000}))
        assert r.status_code in (413, 422), (field, r.status_code)
        assert r.json()["error"]["code"] in ("PAYLOAD_TOO_LARGE", "VALIDATION_ERROR")
    r = await client.post(URL, json=_body(name="n" * (1024 * 1024 + 10)))
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert await scalar(engine, "SELECT count(*) FROM users") == 0


async def test_welcome_email_goes_to_the_console_backend(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="joyhub.email")
    email = unique_email()
    await register(client, email=email)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "joyhub.email"]
    assert any("Welcome" in line and email in line for line in lines)


async def test_welcome_email_over_smtp(make_client: Callable[..., Any]) -> None:
    async with smtp_server() as smtp:
        c = await make_client(email_backend="smtp", smtp_host="127.0.0.1", smtp_port=smtp.port)
        account = await register(c, name="Smtp Tester")
        assert len(smtp.messages) == 1
        msg = smtp.messages[0]
        assert msg["To"] == account.email and "Welcome" in msg["Subject"]
        assert "Smtp Tester" in smtp.bodies()[0]


async def test_failing_mail_server_never_fails_registration(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="joyhub.email")
    c = await make_client(email_backend="smtp", smtp_host="127.0.0.1", smtp_port=free_port())
    account = await register(c)
    assert (await c.get(f"{API}/users/me", headers=account.headers)).status_code == 200
    failures = [rec for rec in caplog.records if rec.getMessage() == "email delivery failed"]
    assert len(failures) == 1 and failures[0].email_kind == "welcome"  # type: ignore[attr-defined]

"""No password, token or key in any log line, across every identity flow (API.md §8).

Logs are captured at DEBUG (SQLAlchemy's statement log included) and rendered through the
app's JSON formatter, so `extra` fields are checked as well as messages. Email goes through a
real SMTP server here: the console backend logs the reset link by design (development only,
see core/email.py), so it is not the backend under test.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from joyhub.core.logging import JsonFormatter
from tests.auth.support import API, OTHER_PASSWORD, STRONG_PASSWORD, bearer, login, register, smtp_server

pytestmark = pytest.mark.integration


async def test_no_secret_reaches_a_log_line(
    make_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # every SQL statement and its parameters
    secrets: list[str] = []
    async with smtp_server() as smtp:
        c = await make_client(
            email_backend="smtp",
            smtp_host="127.0.0.1",
            smtp_port=smtp.port,
            smtp_username=None,
            login_max_failures=3,
        )
        account = await register(c, password=STRONG_PASSWORD)
        secrets += [STRONG_PASSWORD, account.access_token, account.refresh_token]

        assert (await login(c, account.email, "Wrong-Guess-123!")).status_code == 401
        secrets.append("Wrong-Guess-123!")
        pair = (await login(c, account.email, STRONG_PASSWORD)).json()["data"]
        secrets += [pair["access_token"], pair["refresh_token"]]
        form = await c.post(
            f"{API}/auth/token", data={"username": account.email, "password": STRONG_PASSWORD}
        )
        secrets.append(form.json()["access_token"])

        rotated = (await c.post(f"{API}/auth/refresh", json={"refresh_token": pair["refresh_token"]})).json()
        secrets += [rotated["data"]["access_token"], rotated["data"]["refresh_token"]]
        # a replay (logged as a warning, without the token)
        assert (
            await c.post(f"{API}/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        ).status_code == 401

        created = await c.post(f"{API}/users/me/api-keys", json={"name": "ci"}, headers=account.headers)
        key = created.json()["data"]["key"]
        secrets.append(key)
        assert (await c.get(f"{API}/users/me", headers={"X-API-Key": key})).status_code == 200
        assert (await c.get(f"{API}/users/me", headers=bearer(key))).status_code == 200
        assert (await c.get(f"{API}/users/me", headers={"X-API-Key": key + "x"})).status_code == 401
        await c.delete(f"{API}/users/me/api-keys/{created.json()['data']['id']}", headers=account.headers)

        changed = await c.post(
            f"{API}/users/me/password",
            json={"current_password": STRONG_PASSWORD, "new_password": OTHER_PASSWORD},
            headers=account.headers,
        )
        assert changed.status_code == 200
        secrets += [
            OTHER_PASSWORD,
            changed.json()["data"]["access_token"],
            changed.json()["data"]["refresh_token"],
        ]

        assert (await c.post(f"{API}/auth/password-reset", json={"email": account.email})).status_code == 202
        body = next(b for b in smtp.bodies() if "token=" in b)
        reset_token = re.search(r"token=([A-Za-z0-9_-]+)", body).group(1)  # type: ignore[union-attr]
        secrets.append(reset_token)
        final = await c.post(
            f"{API}/auth/password-reset/confirm",
            json={"token": reset_token, "new_password": "Third-Pass-99!"},
        )
        assert final.status_code == 200
        secrets += [
            "Third-Pass-99!",
            final.json()["data"]["access_token"],
            final.json()["data"]["refresh_token"],
        ]
        await c.post(f"{API}/auth/logout", json={"refresh_token": final.json()["data"]["refresh_token"]})

    formatter = JsonFormatter()
    ours = [
        rec for rec in caplog.records if not rec.name.startswith("mail.")
    ]  # mail.*: the test's SMTP server
    assert len(ours) > 100 and any(rec.name.startswith("sqlalchemy") for rec in ours)
    rendered = [formatter.format(rec) for rec in ours] + [rec.getMessage() for rec in ours]
    for secret in secrets:
        leaks = [line for line in rendered if secret in line]
        assert not leaks, f"secret found in logs: {leaks[:1]}"

"""POST /auth/password-reset (issue 12, lower list): the answer leaves before any work that
depends on the email, so known and unknown emails take the same time; one client address may
ask for a limited number of reset emails an hour."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.auth.support import API, SmtpServer, client_from, register, scalar, smtp_server, unique_email

pytestmark = pytest.mark.integration

RESET = f"{API}/auth/password-reset"
ANSWER_SECONDS = 5.0


@pytest.fixture
async def mailbox() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as smtp:
        yield smtp


async def _post_raw(
    app: Any, path: str, body: dict[str, Any]
) -> tuple[asyncio.Task[None], asyncio.Event, list[Any]]:
    """Drive the ASGI app by hand: the task runs the whole request (background work included);
    the event is set as soon as the response is complete on the wire."""
    payload = json.dumps(body).encode()
    answered = asyncio.Event()
    gone = asyncio.Event()
    sent: list[Any] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"hub.test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("hub.test", 80),
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered.set()

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: gone.set())
    return task, answered, sent


async def test_the_answer_leaves_before_any_work_on_the_email(
    make_client: Callable[..., Any], engine: AsyncEngine, mailbox: SmtpServer
) -> None:
    """With the account's row locked by another transaction, the 202 still arrives at once (the
    lookup waits in the background); a request that looked the email up first would hang."""
    c: httpx.AsyncClient = await make_client(
        email_backend="smtp", smtp_host="127.0.0.1", smtp_port=mailbox.port
    )
    account = await register(c)
    welcome = len(mailbox.messages)
    async with engine.connect() as locker:
        transaction = await locker.begin()
        await locker.execute(text("SELECT 1 FROM users WHERE email = :e FOR UPDATE"), {"e": account.email})
        task, answered, sent = await _post_raw(c.app, RESET, {"email": account.email})  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(answered.wait(), ANSWER_SECONDS)
        finally:
            await transaction.rollback()
    assert sent[0]["status"] == 202
    assert len(mailbox.messages) == welcome  # the work had not happened yet
    await asyncio.wait_for(task, ANSWER_SECONDS)  # ...and happens once the row is free
    assert len(mailbox.messages) == welcome + 1
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens") == 1
    # an unknown email: the same answer, no email
    task, answered, sent = await _post_raw(c.app, RESET, {"email": unique_email()})  # type: ignore[attr-defined]
    await asyncio.wait_for(task, ANSWER_SECONDS)
    assert sent[0]["status"] == 202 and len(mailbox.messages) == welcome + 1


async def test_one_address_cannot_mail_every_user(
    make_client: Callable[..., Any], engine: AsyncEngine, mailbox: SmtpServer
) -> None:
    c: httpx.AsyncClient = await make_client(
        email_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=mailbox.port,
        password_reset_max_per_address_per_hour=3,
    )
    accounts = [await register(c) for _ in range(5)]
    before = len(mailbox.messages)
    answers = [await c.post(RESET, json={"email": a.email}) for a in accounts]
    assert [r.status_code for r in answers] == [202, 202, 202, 429, 429]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert len(mailbox.messages) == before + 3
    # unknown emails count the same (the limit never looks at the email)
    assert (await c.post(RESET, json={"email": unique_email()})).status_code == 429
    # another address is not held back
    async with client_from(c, "203.0.113.50") as other:
        assert (await other.post(RESET, json={"email": accounts[4].email})).status_code == 202
    assert len(mailbox.messages) == before + 4
    assert await scalar(engine, "SELECT count(*) FROM password_reset_tokens WHERE used_at IS NULL") == 4


async def test_a_failure_after_the_answer_is_logged_not_raised(
    make_client: Callable[..., Any], engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from joyhub.auth import service as auth_service

    c: httpx.AsyncClient = await make_client()
    account = await register(c)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(auth_service, "request_password_reset", broken)
    r = await c.post(RESET, json={"email": account.email})
    assert r.status_code == 202 and r.json()["data"]["message"]

"""Helpers for the identity tests: register/login over HTTP, direct DB reads, a local SMTP server."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

import httpx
from aiosmtpd.controller import Controller
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

STRONG_PASSWORD = "Tr1cky-Quokka-Lantern"
OTHER_PASSWORD = "Another-Good-Pw-77"
API = "/api/v1"


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


@dataclass
class Registered:
    user_id: str
    email: str
    password: str
    access_token: str
    refresh_token: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def register(
    client: httpx.AsyncClient,
    *,
    email: str | None = None,
    password: str = STRONG_PASSWORD,
    name: str = "Ada Lovelace",
) -> Registered:
    email = email or unique_email()
    r = await client.post(f"{API}/auth/register", json={"name": name, "email": email, "password": password})
    assert r.status_code == 201, r.text
    body = r.json()
    data = body["data"]
    return Registered(
        user_id=data["user"]["id"],
        email=data["user"]["email"],
        password=password,
        access_token=data["tokens"]["access_token"],
        refresh_token=data["tokens"]["refresh_token"],
        body=body,
    )


async def login(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post(f"{API}/auth/login", json={"email": email, "password": password})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


async def issue_reset_token(engine: AsyncEngine, user_id: str) -> str:
    """A live password-reset token for the user, written straight into the database (for tests
    of the confirmation; the console backend never shows a token)."""
    from datetime import timedelta

    from joyhub.core.clock import utcnow
    from joyhub.core.security import new_opaque_token, token_digest

    raw = new_opaque_token(32)
    now = utcnow()
    await execute(
        engine,
        "INSERT INTO password_reset_tokens (id, user_id, token_hash, created_at, expires_at)"
        " VALUES (:id, :user_id, :digest, :now, :expires)",
        id=uuid.uuid4(),
        user_id=uuid.UUID(user_id),
        digest=token_digest(raw),
        now=now,
        expires=now + timedelta(hours=1),
    )
    return raw


def client_from(client: httpx.AsyncClient, address: str, port: int = 40000) -> httpx.AsyncClient:
    """Another client on the same app, seen by it as coming from `address`."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=client.app, client=(address, port)),  # type: ignore[attr-defined]
        base_url="http://hub.test",
        timeout=30,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Inbox:
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content or envelope.content))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


@dataclass
class SmtpServer:
    port: int
    inbox: _Inbox

    @property
    def messages(self) -> list[Message]:
        return self.inbox.messages

    def bodies(self) -> list[str]:
        out = []
        for m in self.messages:
            payload = m.get_payload(decode=True)
            out.append(payload.decode() if isinstance(payload, bytes) else str(m.get_payload()))
        return out


@asynccontextmanager
async def smtp_server() -> AsyncIterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 and a free port, for the duration."""
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield SmtpServer(port, inbox)
    finally:
        await asyncio.to_thread(controller.stop)

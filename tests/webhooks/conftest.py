"""Fixtures of the webhook tests: the loopback receiver, a tool upstream, a real SMTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.auth.support import SmtpServer, smtp_server
from tests.tools.upstream_server import Upstream
from tests.webhooks.receiver import Receiver


@pytest.fixture
def make_client(make_client: Callable[..., Any]) -> Callable[..., Any]:
    """The root `make_client` (so `client` too), with the webhook dispatcher running in the app
    as in `joyhub serve` (the suite's default turns it off elsewhere)."""

    async def factory(**overrides: Any) -> Any:
        overrides.setdefault("webhook_dispatch_in_serve", True)
        return await make_client(**overrides)

    return factory


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as server:
        yield server


@pytest.fixture(autouse=True)
async def _no_dispatcher_outlives_its_app() -> AsyncIterator[None]:
    """Every app the test made has stopped its dispatcher: no task of it is left running."""
    yield
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("joyhub-webhooks") and not t.done()]
    assert not left, [(t.get_name(), _awaiting(t.get_coro())) for t in left]


def _awaiting(coro: Any) -> list[str]:
    """Where a suspended coroutine waits, outermost first (what a task's stack hides)."""
    out = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return out

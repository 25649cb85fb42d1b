"""Fixtures of the webhook tests: the loopback receiver, a tool upstream, a real SMTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.auth.support import SmtpServer, smtp_server
from tests.tools.upstream_server import Upstream
from tests.webhooks.receiver import Receiver


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

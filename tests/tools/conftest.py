"""Fixtures of the gateway tests: the loopback upstream server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.live_hub import live_hub  # noqa: F401 (a fixture: the app over real HTTP)
from tests.tools.upstream_server import Upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()

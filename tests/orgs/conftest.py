"""Fixtures of the teams tests: the loopback upstream server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.tools.upstream_server import Upstream


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()

"""Fixtures of the OpenAI surface's tests: the loopback OpenAI-compatible upstream, the hub over
real HTTP (the official SDK talks to it like to OpenAI)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.live_hub import live_hub  # noqa: F401 (a fixture: the app over real HTTP)
from tests.openai_compat.openai_upstream import OpenAIUpstream


@pytest.fixture
async def oai_upstream() -> AsyncIterator[OpenAIUpstream]:
    server = OpenAIUpstream()
    await server.start()
    yield server
    await server.stop()

"""The app under test served over real HTTP on loopback, inside the test's event loop.

`httpx.ASGITransport` runs an app to completion and hands back the whole body, so it cannot show
a stream arriving chunk by chunk, nor a caller hanging up in the middle. For those tests the app
(test settings, the worker's database) is served by a real uvicorn server on a free port, in a
task of the test's own loop, and called with a real `httpx.AsyncClient` over TCP.

`live_hub` is a factory fixture: `hub = await live_hub(**settings_overrides)` — call it twice for
two instances on one database. Every server, app and client is shut down at the end of the test.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.db import make_sessionmaker
from joyhub.main import create_app
from joyhub.ops import lifecycle
from tests.conftest import test_settings


@dataclass
class LiveHub:
    url: str
    app: FastAPI
    client: httpx.AsyncClient  # real HTTP to `url`
    stop: Callable[[], Awaitable[None]]  # uvicorn's graceful shutdown (the app stays up)


LiveHubFactory = Callable[..., Any]


@pytest.fixture
async def live_hub(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[LiveHubFactory]:
    async with AsyncExitStack() as stack:

        async def start(*, graceful_seconds: float = 1, **overrides: Any) -> LiveHub:
            app = create_app(
                test_settings(tmp_path, **overrides), engine=engine, sessionmaker=make_sessionmaker(engine)
            )
            await stack.enter_async_context(lifecycle.running(app))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=graceful_seconds,
            )
            server = uvicorn.Server(config)
            task = asyncio.create_task(server.serve(sockets=[sock]))

            async def stop() -> None:
                if not task.done():
                    server.should_exit = True
                    await task
                sock.close()

            stack.push_async_callback(stop)
            async with asyncio.timeout(10):
                while not server.started:
                    await asyncio.sleep(0.005)
            url = f"http://127.0.0.1:{port}"
            client = httpx.AsyncClient(base_url=url, timeout=30)
            stack.push_async_callback(client.aclose)
            return LiveHub(url, app, client, stop)

        yield start

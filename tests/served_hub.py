"""A real `joyhub serve` process for tests that need the hub over real HTTP.

`served_database` gives the hub a fresh, migrated database of its own (dropped afterwards);
`hub_process` starts `joyhub serve` on it, on a free port, and kills the whole process group if
the test left it running; `wait_ready` waits until `/ready` answers 200.

Shared by the shutdown tests (tests/ops) and the schemathesis contract test (tests/contract). It
lives in a support module, like tests/factories.py, so that no test module imports another (which
ties one module's collection and imports to another's). A test module uses the fixture by
importing it: `from tests.served_hub import served_database`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from joyhub.core.db import make_engine
from joyhub.core.migrations import migrate_async
from tests.conftest import TEST_SECRET
from tests.conftest import test_settings as hub_settings
from tests.db_server import fresh_database_name, server_url, with_database

JOYHUB = Path(sys.executable).with_name("joyhub")


@dataclass
class ServedDatabase:
    url: str
    engine: AsyncEngine  # ours: application_name "joyhub-test", so the hub's connections stand apart


@pytest.fixture
async def served_database(worker_id_str: str) -> AsyncIterator[ServedDatabase]:
    """A fresh, migrated database of its own for the hub subprocess; dropped afterwards."""
    admin_url = await asyncio.to_thread(server_url)
    name = fresh_database_name(f"{worker_id_str}_serve")
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
        # a test database need not survive a crash of its server: commits stop waiting for
        # the WAL flush (same semantics for every session, only durability is given up)
        await conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    url = with_database(admin_url, name)
    await migrate_async(url)
    engine = make_engine(
        url,
        hub_settings(),
        pool_size=5,
        connect_args={"server_settings": {"application_name": "joyhub-test", "timezone": "UTC"}},
    )
    try:
        yield ServedDatabase(url, engine)
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Hub:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def hub_process(
    database_url: str, data_dir: Path, *, workers: int = 1, log_level: str = "WARNING"
) -> Iterator[Hub]:
    """`joyhub serve` on a free port; killed (whole process group) if the test left it running."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ADMIN_", "PROMETHEUS_"))}
    env.update(
        DATABASE_URL=database_url,
        JWT_SECRET_KEY=TEST_SECRET,
        LOG_LEVEL=log_level,
        DATA_DIR=str(data_dir),
        ENVIRONMENT="development",
        SWEEP_INTERVAL_SECONDS="3600",
    )
    log_path = data_dir / "hub.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(JOYHUB), "serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            cwd=data_dir,  # no stray .env from the checkout
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    hub = Hub(proc, port, log_path)
    try:
        yield hub
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.asynccontextmanager
async def served_in_process(
    app: Any, timeout: float = 15.0, send_buffer: int | None = None, **options: Any
) -> AsyncIterator[int]:
    """An already started app behind a real uvicorn server on loopback, in this process (for
    tests that need real sockets: slow readers, forwarded headers); yields the port.

    `send_buffer` fixes the kernel send buffer of every accepted connection (no autotuning), so
    a client that stops reading blocks the server after a few kilobytes, not megabytes.
    """
    import uvicorn

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:  # inherited by the accepted sockets
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    config = {"lifespan": "off", "log_config": None, "access_log": False, **options}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with asyncio.timeout(timeout):
            while not server.started:
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout)
        listener.close()


async def wait_ready(hub: Hub, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=hub.base_url, timeout=2) as c:
        while time.monotonic() < deadline:
            assert hub.proc.poll() is None, f"hub exited during start-up:\n{hub.log()}"
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"hub not ready within {timeout} s:\n{hub.log()}")

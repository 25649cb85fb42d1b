"""Graceful shutdown of a real `joyhub serve` process (issue 7).

On SIGTERM the hub stops accepting connections, lets the invocations in flight finish and
settle, closes its pool and exits 0. No admitted call is left `pending` by a normal shutdown.

The hub runs as a subprocess on a fresh database of the test server (tests/served_hub.py); its
upstream is a loopback server in this test's event loop that holds every answer until the test
releases it, so "the calls are still in flight when SIGTERM arrives" is a fact, not a timing guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.served_hub import Hub, ServedDatabase, hub_process, served_database, wait_ready
from tests.tools.helpers import make_caller, make_tool

pytestmark = pytest.mark.integration

__all__ = ["served_database"]  # the fixture, used by name

CALLS = 10
TOKENS_PER_CALL = 5
GATE_SAFETY_SECONDS = 10.0  # the upstream answers by itself after this, so a bug cannot hang the run


# ----------------------------------------------------------------------------- the upstream


@dataclass
class GatedUpstream:
    """Answers every POST with `usage.total_tokens = 5`, but only once `release()` is called."""

    port: int = 0
    arrived: int = 0
    answered: int = 0
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)
    _expected: int = CALLS
    _server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/run"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()

    def release(self) -> None:
        self._gate.set()

    async def wait_all_arrived(self, timeout: float) -> None:
        await asyncio.wait_for(self._all_in.wait(), timeout)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = json.dumps({"result": "ok", "usage": {"total_tokens": TOKENS_PER_CALL}}).encode()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                self.arrived += 1
                if self.arrived >= self._expected:
                    self._all_in.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate.wait(), GATE_SAFETY_SECONDS)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def gated_upstream() -> AsyncIterator[GatedUpstream]:
    up = GatedUpstream()
    await up.start()
    yield up
    await up.stop()


# ------------------------------------------------------------------ the hub process


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def wait_exit(hub: Hub, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while hub.proc.poll() is None:
        assert time.monotonic() < deadline, f"hub still running {timeout} s after SIGTERM:\n{hub.log()}"
        await asyncio.sleep(0.05)
    return hub.proc.returncode


async def wait_listener_closed(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(_port_open, port):
        assert time.monotonic() < deadline, "the hub kept accepting connections after SIGTERM"
        await asyncio.sleep(0.05)


async def hub_connections(engine: AsyncEngine) -> int:
    """Connections the hub holds on its database (ours are named differently)."""
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND application_name = 'joyhub'"
                    )
                )
            ).scalar_one()
        )


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_in_flight_invocations_and_settles_them(
    served_database: ServedDatabase, gated_upstream: GatedUpstream, tmp_path: Path, workers: int
) -> None:
    """With one process and with `--workers 2` (where the supervisor must also let go of the
    listening socket, or new connections would hang in its backlog during the drain)."""
    db = served_database
    tool_id = await make_tool(db.engine, gated_upstream.url, timeout_seconds=20, max_attempts=1)
    caller = await make_caller(db.engine, "pro")

    with hub_process(db.url, tmp_path, workers=workers) as hub:
        await wait_ready(hub)
        limits = httpx.Limits(max_connections=CALLS + 5, max_keepalive_connections=CALLS + 5)
        async with httpx.AsyncClient(base_url=hub.base_url, timeout=30, limits=limits) as c:
            calls = [
                asyncio.create_task(
                    c.post(
                        f"/api/v1/tools/{tool_id}/invoke",
                        json={"input": {"n": i}},
                        headers=caller.headers,
                    )
                )
                for i in range(CALLS)
            ]
            # every call admitted, committed and waiting on the upstream
            await gated_upstream.wait_all_arrived(10)
            hub.proc.send_signal(signal.SIGTERM)

            # stop accepting: the listener closes while the calls are still being answered
            await wait_listener_closed(hub.port)
            assert not any(t.done() for t in calls)
            assert hub.proc.poll() is None

            gated_upstream.release()
            responses = await asyncio.wait_for(asyncio.gather(*calls), 15)

        assert [r.status_code for r in responses] == [200] * CALLS, [r.text for r in responses]
        assert all(r.json()["data"]["tokens_used"] == TOKENS_PER_CALL for r in responses)
        code = await wait_exit(hub)
        assert code == 0, hub.log()
        assert not _port_open(hub.port)
        assert "Traceback" not in hub.log()

    assert await hub_connections(db.engine) == 0  # the pool was closed
    async with db.engine.connect() as conn:
        logs = (
            await conn.execute(
                text("SELECT status, tokens_used FROM usage_logs WHERE user_id = :u"), {"u": caller.user_id}
            )
        ).all()
        sub = (
            await conn.execute(
                text("SELECT tokens_used, tokens_reserved, inflight FROM subscriptions WHERE user_id = :u"),
                {"u": caller.user_id},
            )
        ).one()
    assert len(logs) == CALLS
    assert {log.status for log in logs} == {"success"}  # nothing pending, nothing lost
    assert sub.tokens_used == sum(log.tokens_used for log in logs) == CALLS * TOKENS_PER_CALL
    assert (sub.tokens_reserved, sub.inflight) == (0, 0)
    assert gated_upstream.answered == CALLS


async def test_two_workers_serve_aggregate_metrics_and_stop_on_sigterm(
    served_database: ServedDatabase, tmp_path: Path
) -> None:
    with hub_process(served_database.url, tmp_path, workers=2, log_level="INFO") as hub:
        await wait_ready(hub)
        parent = psutil.Process(hub.proc.pid)
        workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2

        async def health() -> int:
            async with httpx.AsyncClient(base_url=hub.base_url, timeout=5) as fresh:  # new connection
                return (await fresh.get("/health")).status_code

        statuses = await asyncio.gather(*(health() for _ in range(40)))
        assert statuses == [200] * 40
        async with httpx.AsyncClient(base_url=hub.base_url, timeout=5) as c:
            assert (await c.get("/ready")).json()["data"]["checks"]["database"] == "ok"
            exposition = (await c.get("/metrics")).text
        # one exposition for the whole server, whichever worker answers the scrape
        line = 'joyhub_http_requests_total{method="GET",route="/health",status="200"} 40.0'
        assert line in exposition, exposition[-2000:]

        hub.proc.send_signal(signal.SIGTERM)
        code = await wait_exit(hub)
        assert code == 0, hub.log()
        assert not _port_open(hub.port)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        lines = hub.log_path.read_text().splitlines()
    # the spawned workers log JSON lines too (their logging is set up in the worker, not only
    # in the parent), with the request id on access lines; every worker stopped cleanly
    records = [json.loads(line) for line in lines]
    assert all({"timestamp", "level", "message", "request_id"} <= r.keys() for r in records)
    access = [r for r in records if r.get("logger") == "joyhub.access" and r.get("path") == "/health"]
    assert len(access) == 40 and all(r["request_id"] and r["status"] == 200 for r in access)
    stopped = [r for r in records if r["message"] == "hub stopped"]
    assert len(stopped) == 2, [r["message"] for r in records]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert await hub_connections(served_database.engine) == 0


async def test_sigterm_while_idle_exits_promptly(served_database: ServedDatabase, tmp_path: Path) -> None:
    """No calls in flight: nothing to wait for, so SIGTERM ends the process in well under a second
    of drain (the bound here is generous; it guards against a shutdown that waits for nothing)."""
    with hub_process(served_database.url, tmp_path) as hub:
        await wait_ready(hub)
        async with httpx.AsyncClient(base_url=hub.base_url, timeout=5) as c:  # an idle keep-alive
            assert (await c.get("/health")).status_code == 200
            hub.proc.send_signal(signal.SIGTERM)
            assert await wait_exit(hub, timeout=10) == 0
        assert "Traceback" not in hub.log()

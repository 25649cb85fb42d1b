"""The gateway's per-process resources, made at start-up and closed at shutdown.

`start` puts on `app.state`: `http` (the shared upstream connection pool), `breakers` (Redis-backed when
`app.state.redis` is set, in-process otherwise) and `tools` (this Runtime, which also tracks the
invocations in flight and holds the admission gate, `admission.py`, and what it knows of each
tool's current version, `tool_versions.py`). With `JOYHUB_DEMO=1`
(`joyhub serve --demo`) it also registers the demo tools and makes sure an admin exists. On
shutdown the invocations still running are given time to finish and settle before the client
closes, so a deploy does not leave calls unaccounted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from joyhub.core.config import Settings
from joyhub.tools import upstream
from joyhub.tools.admission import AdmissionGate
from joyhub.tools.breaker import Breakers, InProcessBreakers, RedisBreakers
from joyhub.tools.tool_versions import ToolVersions

log = logging.getLogger("joyhub.tools")

T = TypeVar("T")
DRAIN_SECONDS = 30.0


class Runtime:
    def __init__(self, http: httpx.AsyncBaseTransport, breakers: Breakers, gate: AdmissionGate) -> None:
        self.http = http
        self.breakers = breakers
        self.gate = gate
        self.tool_versions = ToolVersions()
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` as a task that outlives its request (strong reference until done)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace_seconds: float = DRAIN_SECONDS) -> None:
        """Wait (bounded) for invocations still running; the sweep closes any left behind."""
        if not self._tasks:
            return
        log.info("waiting for invocations in flight", extra={"count": len(self._tasks)})
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        if pending:
            log.warning("invocations still running at shutdown", extra={"count": len(pending)})


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the task's outcome as seen: a refusal raised after its client left is not news."""
    if not task.cancelled():
        task.exception()


def _skip_missing_sniffio() -> None:
    """Make httpcore's `import sniffio` fail fast when sniffio is not installed.

    httpcore tries that import whenever it creates a lock — several times per upstream request —
    and anyio 4 no longer pulls sniffio in. A failed import is not cached: each one walks
    sys.path (about 0.1 ms apiece here). Recording the absence in `sys.modules` makes the import
    raise ImportError at once, which is exactly what httpcore handles ("asyncio").
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def make_breakers(settings: Settings, redis: Any) -> Breakers:
    if redis is not None:
        return RedisBreakers(redis, settings.circuit_failure_threshold, settings.circuit_recovery_seconds)
    return InProcessBreakers(settings.circuit_failure_threshold, settings.circuit_recovery_seconds)


async def start(app: FastAPI, stack: AsyncExitStack) -> None:
    settings: Settings = app.state.settings
    _skip_missing_sniffio()
    http = upstream.make_transport(app.state.egress)
    stack.push_async_callback(http.aclose)
    runtime = Runtime(
        http,
        make_breakers(settings, getattr(app.state, "redis", None)),
        AdmissionGate(settings.gateway_max_admissions, settings.gateway_queue_timeout_seconds),
    )
    stack.push_async_callback(runtime.drain)  # runs before the client closes (LIFO)
    app.state.http = http
    app.state.breakers = runtime.breakers
    app.state.tools = runtime
    if os.environ.get("JOYHUB_DEMO") == "1":
        from joyhub.tools import demo

        await demo.setup(app)

"""A real webhook receiver on loopback (aiohttp's server) that keeps what it receives.

The answer is chosen by the request path, so one receiver serves several endpoints:

| path                | answer                                                              |
|---------------------|---------------------------------------------------------------------|
| /ok (any other)     | 200 `ok`                                                            |
| /status/<code>      | that status                                                         |
| /script/<name>      | the next status of `script(name, [...])`, then 200 when it runs out |
| /redirect           | 302 to /ok (which a correct sender never follows)                   |
| /blackhole          | never answers (until the receiver stops)                            |

`stop()` closes the port (a receiver that is down: connections are refused); `start()` opens the
same port again. `wait_for(n)` waits (bounded) until n requests have arrived — tests wait on
that condition, never on a sleep.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    hanging: int = 0
    _scripts: dict[str, deque[int]] = field(default_factory=lambda: defaultdict(deque))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/ok") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, name: str, statuses: list[int]) -> str:
        """The URL of /script/<name>, which answers `statuses` in turn, then 200."""
        self._scripts[name].extend(statuses)
        return self.url(f"/script/{name}")

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._release = asyncio.Event()
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, *, path: str | None = None, timeout: float = 20) -> list[Received]:
        """The requests (to `path`, if given) once there are at least `count` of them."""

        def enough() -> bool:
            return len(self.at(path) if path else self.received) >= count

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(enough)
        return self.at(path) if path else list(self.received)

    async def wait_hanging(self, count: int, *, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.hanging >= count)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        got = Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        async with self._changed:
            self.received.append(got)
            self._changed.notify_all()
        path = request.path
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]))
        if path.startswith("/script/"):
            queue = self._scripts[path.rsplit("/", 1)[1]]
            return web.Response(status=queue.popleft() if queue else 200)
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": self.url("/ok")})
        if path == "/blackhole":
            async with self._changed:
                self.hanging += 1
                self._changed.notify_all()
            await self._release.wait()
            return web.Response(status=200)
        return web.Response(text="ok")

"""A real HTTP/1.1 upstream on loopback for gateway tests, misbehaving on request.

A raw asyncio server (no framework between the test and the bytes on the wire), so it can do
what a framework would not: reset the connection mid-headers or mid-body, hang, send 11 MiB,
lie about its content. The behaviour is chosen by the request path; query parameters tune it.
Every request is counted by its full target (`/flap?key=a&fail=2`), and the last request of each
target is kept (headers and body) so tests can look at what the hub sent.

| path            | behaviour                                                                 |
|-----------------|---------------------------------------------------------------------------|
| /fast           | 200 `{"echo": input, "usage": {"total_tokens": tokens}}` (tokens=7)       |
| /tokens_used    | 200 `{"tokens_used": n}`                                                  |
| /no_usage       | 200 `{"text": "x" * size}` — no token count, the hub estimates           |
| /slow           | sleeps `delay` seconds, then like /fast (`max_running` counts overlaps)   |
| /hang           | never answers                                                             |
| /status         | `code` (e.g. 400) with `{"message": msg}`                                 |
| /flap           | the first `fail` hits per `key` answer 500 (or `code`), then like /fast   |
| /retry_after    | the first `fail` hits per `key` answer 429 with Retry-After `after`       |
| /reset_headers  | writes half a status line, then resets the connection                     |
| /reset_body     | declares 1000 bytes, sends 10, then resets                                |
| /nonjson        | 200 text/plain                                                            |
| /nan            | 200 with a NaN inside (not JSON by the standard)                          |
| /nul            | 200 JSON whose string contains \\u0000                                    |
| /big            | 200 JSON of `mib` MiB (Content-Length, or chunked with `chunked=1`)       |
| /redirect       | 302 to /fast                                                              |
| /echo_headers   | 200 with the request headers it received                                  |
| /set_cookie     | 200 like /fast, with `Set-Cookie: session=leak; Path=/`                   |
| /gzip           | 200 gzip-encoded JSON that decodes to `mib` MiB (a small compressed bomb) |
| /garbage        | a status line that is not HTTP, then closes                               |
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    422: "Unprocessable",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    host: str = "127.0.0.1"
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    last: dict[str, Seen] = field(default_factory=dict)
    _keys: Counter[str] = field(default_factory=Counter)
    running: int = 0  # /slow requests being served right now
    max_running: int = 0  # the most at any moment
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def url(self, target: str) -> str:
        return f"http://{self.host}:{self.port}{target}"

    def count(self, target: str) -> int:
        return self.hits[target]

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.hits[target] += 1
                self.last[target] = Seen(method, target, headers, body)
                keep = await self._respond(target, headers, body, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs cancelled handlers)
            return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bool:
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True

    async def _respond(
        self, target: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        parts = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        try:
            doc: Any = json.loads(body) if body else None
        except ValueError:
            doc = None

        def fast(tokens: int | None = None) -> bytes:
            n = int(q.get("tokens", "7")) if tokens is None else tokens
            return json.dumps({"echo": doc, "usage": {"total_tokens": n}}).encode()

        if path == "/fast":
            return await self._send(writer, 200, fast())
        if path == "/tokens_used":
            return await self._send(writer, 200, json.dumps({"tokens_used": int(q["n"])}).encode())
        if path == "/no_usage":
            return await self._send(
                writer, 200, json.dumps({"text": "x" * int(q.get("size", "10"))}).encode()
            )
        if path == "/slow":
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                await asyncio.sleep(float(q.get("delay", "0.2")))
            finally:
                self.running -= 1
            return await self._send(writer, 200, fast())
        if path == "/hang":
            await asyncio.sleep(3600)
            return False
        if path == "/status":
            code = int(q.get("code", "400"))
            msg = q.get("msg", "bad input")
            return await self._send(writer, code, json.dumps({"message": msg}).encode())
        if path in ("/flap", "/retry_after"):
            key = f"{path}:{q.get('key', '')}"
            self._keys[key] += 1
            if self._keys[key] <= int(q.get("fail", "1")):
                if path == "/flap":
                    code = int(q.get("code", "500"))
                    return await self._send(writer, code, b'{"message": "flapping"}')
                return await self._send(
                    writer, 429, b'{"message": "slow down"}', extra={"Retry-After": q.get("after", "0.1")}
                )
            return await self._send(writer, 200, fast())
        if path == "/reset_headers":
            writer.write(b"HTTP/1.1 200 O")
            await writer.drain()
            writer.transport.abort()
            return False
        if path == "/reset_body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
            writer.write(b'{"partial":')
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.transport.abort()
            return False
        if path == "/nonjson":
            return await self._send(writer, 200, b"hello, not json", content_type="text/plain")
        if path == "/nan":
            return await self._send(writer, 200, b'{"value": NaN}')
        if path == "/nul":
            return await self._send(writer, 200, b'{"text": "a\\u0000b", "usage": {"total_tokens": 3}}')
        if path == "/big":
            return await self._big(writer, float(q.get("mib", "11")), q.get("chunked") == "1")
        if path == "/redirect":
            return await self._send(writer, 302, b"", extra={"Location": self.url("/fast")})
        if path == "/set_cookie":
            return await self._send(writer, 200, fast(), extra={"Set-Cookie": "session=leak; Path=/"})
        if path == "/gzip":
            size = int(float(q.get("mib", "11")) * 1024 * 1024)
            packed = gzip.compress(b'{"data":"' + b"a" * size + b'"}', compresslevel=1)
            return await self._send(writer, 200, packed, extra={"Content-Encoding": "gzip"})
        if path == "/garbage":
            writer.write(b"SPDY/9 what\r\n\r\n")
            await writer.drain()
            writer.close()
            return False
        if path == "/echo_headers":
            payload = {"headers": headers, "usage": {"total_tokens": 2}}
            return await self._send(writer, 200, json.dumps(payload).encode())
        return await self._send(writer, 404, b'{"message": "no such behaviour"}')

    @staticmethod
    async def _big(writer: asyncio.StreamWriter, mib: float, chunked: bool) -> bool:
        size = int(mib * 1024 * 1024)
        prefix, suffix = b'{"data": "', b'"}'
        filler = size - len(prefix) - len(suffix)
        chunk = b"a" * 65536
        if chunked:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )

            def frame(data: bytes) -> bytes:
                return f"{len(data):x}\r\n".encode() + data + b"\r\n"
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
            )

            def frame(data: bytes) -> bytes:
                return data

        try:
            writer.write(frame(prefix))
            sent = 0
            while sent < filler:
                piece = chunk[: min(len(chunk), filler - sent)]
                writer.write(frame(piece))
                sent += len(piece)
                await writer.drain()
            writer.write(frame(suffix))
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            return False
        return True

"""A real streaming tool on loopback (Server-Sent Events over chunked HTTP/1.1), misbehaving on
request, for the streaming tests (API.md §5.1).

A raw asyncio server, like `upstream_server.py`, so it can drip events, stall, die mid-stream
and notice at once when the hub closes the connection (a reader waits for EOF beside the writer).
Each stream is remembered under its `key` query parameter (`streams[key]`): events sent, when it
started and when its connection was closed by the other side.

`GET|POST /sse?key=k&n=5&every=0.02` sends `n` events `{"index": i, "text": "w<i>"}`, one every
`every` seconds, then `data: [DONE]`. Options:

| parameter      | effect                                                                  |
|----------------|-------------------------------------------------------------------------|
| usage=last     | the last event carries `usage.total_tokens` = `tokens` (default)       |
| usage=middle   | the event at n // 2 carries it                                          |
| usage=none     | no event carries it                                                     |
| usage=last_only | an extra final event `{"choices": [], "usage": {...}}` (OpenAI's shape) |
| end=eof        | no `[DONE]`: the body just ends                                         |
| first=S        | wait S seconds before the first event                                   |
| gap_at=K&gap=S | wait S seconds before event K                                           |
| die_at=K       | reset the connection after K events                                     |
| bad_at=K       | event K is not JSON                                                     |
| pad=B          | each event carries B bytes of padding text                              |
| crlf=1         | lines end in CRLF                                                       |
| fail=F         | the first F hits of this key answer 500 (retried before the first event) |
| json=1         | answer plain JSON (no stream)                                           |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class StreamSeen:
    started: float
    sent: int = 0
    closed_by_peer_at: float | None = None
    finished: bool = False


@dataclass
class SseUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    streams: dict[str, StreamSeen] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def url(self, target: str) -> str:
        return f"http://{self.host}:{self.port}{target}"

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

    async def wait_closed(self, key: str, timeout: float = 5.0) -> StreamSeen:
        """The stream `key` once its connection was closed by the hub (or it finished)."""
        async with asyncio.timeout(timeout):
            while True:
                seen = self.streams.get(key)
                if seen is not None and (seen.closed_by_peer_at is not None or seen.finished):
                    return seen
                await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            _, target, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
            }
            await reader.readexactly(int(headers.get("content-length", "0")))
            await self._respond(target, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        key = q.get("key", target)
        self.hits[key] += 1
        if self.hits[key] <= int(q.get("fail", "0")):
            body = b'{"message": "flapping"}'
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Type: application/json\r\nConnection: close\r\n")
            writer.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return
        n = int(q.get("n", "5"))
        tokens = int(q.get("tokens", "11"))
        if q.get("json") == "1":
            body = json.dumps({"text": "whole", "usage": {"total_tokens": tokens}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n")
            writer.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return
        seen = self.streams[key] = StreamSeen(started=time.monotonic())
        watcher = asyncio.create_task(self._watch_eof(reader, seen))
        try:
            await self._stream(q, n, tokens, seen, writer)
        except ConnectionError:
            if seen.closed_by_peer_at is None:
                seen.closed_by_peer_at = time.monotonic()
        finally:
            watcher.cancel()

    @staticmethod
    async def _watch_eof(reader: asyncio.StreamReader, seen: StreamSeen) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # returns at EOF: the hub closed its side
        if not seen.finished and seen.closed_by_peer_at is None:
            seen.closed_by_peer_at = time.monotonic()

    async def _stream(
        self, q: dict[str, str], n: int, tokens: int, seen: StreamSeen, writer: asyncio.StreamWriter
    ) -> None:
        eol = "\r\n" if q.get("crlf") == "1" else "\n"
        usage = q.get("usage", "last")
        every = float(q.get("every", "0.02"))
        pad = "p" * int(q.get("pad", "0"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )

        async def send(text: str) -> None:
            data = text.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        if "first" in q:
            await asyncio.sleep(float(q["first"]))
        for i in range(n):
            if str(i) == q.get("gap_at"):
                await asyncio.sleep(float(q.get("gap", "1")))
            elif i:
                await asyncio.sleep(every)
            if str(i) == q.get("die_at"):
                writer.transport.abort()
                return
            event: dict[str, Any] = {"index": i, "text": f"w{i}"}
            if pad:
                event["pad"] = pad
            if (usage == "last" and i == n - 1) or (usage == "middle" and i == n // 2):
                event["usage"] = {"total_tokens": tokens}
            payload = "not json {" if str(i) == q.get("bad_at") else json.dumps(event)
            await send(f"data: {payload}{eol}{eol}")
            seen.sent += 1
        if usage == "last_only":
            await send(f'data: {{"choices": [], "usage": {{"total_tokens": {tokens}}}}}{eol}{eol}')
            seen.sent += 1
        if q.get("die_at") == str(n):
            writer.transport.abort()
            return
        if q.get("end") != "eof":
            await send(f"data: [DONE]{eol}{eol}")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        seen.finished = True

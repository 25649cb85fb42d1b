"""A mock streaming tool for the benchmarks: Server-Sent Events over raw asyncio (uvloop when
installed), in a process of its own.

Every POST is answered `200 text/event-stream` (chunked, keep-alive) with `chunks` events
`data: {"i": k, "ts": <unix time it was written>, "choices": [{"delta": {"content": "tok "}}]}`,
the last one also carrying `"usage": {"total_tokens": chunks * TOKENS_PER_CHUNK}`, then
`data: [DONE]`. The query string sets the shape of each answer:

- `chunks` (default 10): how many events;
- `plain=1`: no stream, a plain JSON answer `{"result": "ok", "usage": {"total_tokens": chunks}}`
  (a non-streaming tool, for comparison);
- `interval` (seconds, default 0): the first event goes out at once, event k at k·interval
  after it (an absolute schedule, so a busy loop does not stretch the stream). With 0 the whole
  answer is written at once: the upstream sends as fast as it can and the hub's reading side is
  never the one waiting.

Why its own process and raw asyncio: the hub's cost per relayed chunk is a few microseconds, so
an upstream written with a framework would take a large share of the two cores the hub is being
measured on. Everything here is precomputed or a single `write` per event.

Run: `python bench/load/sse_upstream.py PORT` (the benchmark starts it; `sse_upstream()` below).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import free_port, port_open, run_loop  # noqa: E402

TOKENS_PER_CHUNK = 1
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_DONE = b"data: [DONE]\n\n"
_DELTA = b'"choices":[{"delta":{"content":"tok "}}]'


def _wire(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of the chunked body."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def event(k: int, n: int, ts: float) -> bytes:
    """The k-th of n events (the last one reports the usage of the whole answer)."""
    usage = b',"usage":{"total_tokens":%d}' % (n * TOKENS_PER_CHUNK) if k == n - 1 else b""
    return b'data: {"i":%d,"ts":%.6f,%s%s}\n\n' % (k, ts, _DELTA, usage)


_whole_answers: dict[int, bytes] = {}


def whole_answer(n: int) -> bytes:
    """The head and all n events at once (for interval 0; cached, `ts` is the first write's)."""
    answer = _whole_answers.get(n)
    if answer is None:
        now = time.time()
        body = b"".join(event(k, n, now) for k in range(n)) + _DONE
        answer = _whole_answers[n] = _HEAD + _wire(body) + b"0\r\n\r\n"
    return answer


def plain_answer(n: int) -> bytes:
    body = b'{"result":"ok","usage":{"total_tokens":%d}}' % (n * TOKENS_PER_CHUNK)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def _shape(target: bytes) -> tuple[int, float, bool]:
    query = parse_qs(urlsplit(target.decode("latin-1")).query)
    chunks = max(1, int(query.get("chunks", ["10"])[0]))
    interval = max(0.0, float(query.get("interval", ["0"])[0]))
    return chunks, interval, query.get("plain", ["0"])[0] == "1"


async def _paced(writer: asyncio.StreamWriter, n: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    writer.write(_HEAD)
    start = loop.time()
    for k in range(n):
        delay = start + k * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if writer.is_closing():  # the hub hung up (a cancelled stream)
            return
        writer.write(_wire(event(k, n, time.time())))
    writer.write(_wire(_DONE) + b"0\r\n\r\n")
    await writer.drain()


async def _connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            chunks, interval, plain = _shape(target)
            if plain:
                writer.write(plain_answer(chunks))
            elif interval == 0:
                writer.write(whole_answer(chunks))
                await writer.drain()
            else:
                await _paced(writer, chunks, interval)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_connection, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def sse_upstream() -> Iterator[str]:
    """The mock in its own process; yields its base URL (append `?chunks=…&interval=…`)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, str(port)], start_new_session=True)
    try:
        deadline = time.time() + 10
        while not port_open(port):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the mock SSE upstream did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/stream"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


if __name__ == "__main__":
    run_loop(serve(int(sys.argv[1])))

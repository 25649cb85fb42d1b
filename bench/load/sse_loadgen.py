"""The load generator for Server-Sent Events: many streams read at once, every event counted.

Raw asyncio sockets on uvloop (when installed), HTTP/1.1 keep-alive, chunked bodies de-chunked
and split into events by hand, in a process of its own (`run_streams` starts it and reads its
JSON report) so that reading 1,000 streams never shares a GIL, or an event loop, with what
measures the hub. Its own CPU time is part of the report, to show it was not the bottleneck.

What a run is (`Spec`): `connections` keep-alive connections, each sending `per_connection`
stream requests one after the other (the next once the previous stream has ended), the
connections' starts spread evenly over `ramp` seconds. Connection i sends `headers[i % len]`
(one caller per connection when there are as many header sets as connections).

What it reads, in either of two dialects:
- `hub`: the hub's relay (API.md §5.1): `event: chunk` frames, then `event: done` (whose
  `tokens_used` is summed) or `event: error` (whose `code` is counted); `: ping` comments;
  a refusal before the stream (a JSON envelope, any status but 200) is an error by its status.
- `direct`: the mock upstream itself (`sse_upstream.py`): `data: {...}` events, `data: [DONE]`.
In both, a 200 `application/json` answer is one whole call (`_whole`): the hub's `Invocation`
(a streaming tool called without `stream: true`, its chunks in `output.chunks`, or a plain
tool), or the mock's plain JSON answer; its time to first chunk is its time to the whole answer.

Per stream it records the time from writing the request to the first chunk (`ttfc_ms`) and to
the end (`total_ms`), and when `delays` is set, each chunk's delay: its arrival here minus the
`ts` the mock wrote into it (both `time.time()` on the same machine), i.e. how late the hub
relayed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
READ_BYTES = 256 * 1024


@dataclass(frozen=True)
class Spec:
    url: str
    headers: list[dict[str, str]]
    body: str
    dialect: str = "hub"  # "hub" | "direct"
    connections: int = 1
    per_connection: int = 1
    ramp: float = 0.0
    delays: bool = False  # parse each chunk's `ts` (costs a little CPU per chunk)
    stream_timeout: float = 120.0  # a stream that takes longer is counted as an error


@dataclass
class Report:
    streams: int = 0  # requests sent
    completed: int = 0  # ended with `done` (hub) / `[DONE]` (direct)
    chunks: int = 0  # chunk events received, over all streams
    pings: int = 0
    tokens_done: int = 0  # Σ tokens_used of the `done` events
    errors: dict[str, int] = field(default_factory=dict)  # "http 503", "TOOL_TIMEOUT", "socket …"
    chunks_per_stream: dict[str, int] = field(default_factory=dict)  # histogram: chunks → streams
    ttfc_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    delay_ms: list[float] = field(default_factory=list)
    # per stream, seconds from the start of the run (`started_at`, unix time): when its request
    # was written, its first chunk arrived, it ended — the run's timeline
    requested_s: list[float] = field(default_factory=list)
    first_chunk_s: list[float] = field(default_factory=list)
    ended_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    seconds: float = 0.0  # wall clock, first request to last end
    cpu_seconds: float = 0.0  # this process's own user+system CPU
    max_open: int = 0  # streams open at once, at the peak

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Dechunker:
    """An HTTP/1.1 chunked body, fed in pieces of any size; `done` after the last chunk."""

    __slots__ = ("_buf", "_need", "_skip", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._need = 0  # payload bytes left in the current chunk
        self._skip = 0  # bytes of the CRLF after a chunk's payload left to skip
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        out: list[bytes] = []
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._need -= take
                if self._need:
                    break
                self._skip = 2
            if self._skip:
                take = min(self._skip, end - pos)
                pos += take
                self._skip -= take
                if self._skip:
                    break
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk: done once its empty trailer line is here too
                if end - (nl + 2) >= 2:
                    self.done = True
                    pos = end
                break
            pos = nl + 2
            self._need = size
        self._buf = buf[pos:]
        return b"".join(out)


_TS = re.compile(rb'"ts":([0-9.]+)')


@dataclass
class _StreamState:
    """What one stream's events said so far."""

    chunks: int = 0
    first_chunk_at: float = 0.0
    ended: str = ""  # "done", or the error that ended it


def _events(
    payload: bytes, pending: bytes, state: _StreamState, spec: Spec, out: Report, now_wall: float
) -> bytes:
    """Count the complete events in `pending + payload`; return the incomplete tail."""
    buf = pending + payload if pending else payload
    if b"\n\n" not in buf:
        return buf
    *events, tail = buf.split(b"\n\n")
    hub = spec.dialect == "hub"
    for ev in events:
        if hub:
            if ev.startswith(b"event: chunk"):
                data = ev
            elif ev.startswith(b":"):
                out.pings += 1
                continue
            elif ev.startswith(b"event: done"):
                doc = json.loads(ev.split(b"data: ", 1)[1])
                out.tokens_done += int(doc["tokens_used"])
                state.ended = "done"
                continue
            elif ev.startswith(b"event: error"):
                doc = json.loads(ev.split(b"data: ", 1)[1])
                state.ended = str(doc.get("code", "error"))
                continue
            else:
                continue
        else:
            if ev == b"data: [DONE]":
                state.ended = "done"
                continue
            if not ev.startswith(b"data: "):
                continue
            data = ev
        state.chunks += 1
        if state.chunks == 1:
            state.first_chunk_at = time.perf_counter()
        if spec.delays:
            m = _TS.search(data)
            if m:
                out.delay_ms.append((now_wall - float(m.group(1))) * 1000)
    return tail


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0][9:12])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


@dataclass
class _Run:
    """One run's shared state: what to do, what was seen, its start, the streams open now."""

    spec: Spec
    out: Report
    t0: float  # time.perf_counter() at the start
    open: int = 0


async def _one_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, run: _Run
) -> bool:
    """One request and its whole answer; False when the connection cannot be reused."""
    spec, out = run.spec, run.out
    state = _StreamState()
    started = time.perf_counter()
    writer.write(request)
    status, headers = await _read_head(reader)
    chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
    if status == 200 and headers.get(b"content-type", b"").startswith(b"application/json"):
        return _whole(await reader.readexactly(int(headers[b"content-length"])), started, out)
    if status != 200 or not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        code = f"http {status}"
        if b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code += " " + str(json.loads(body)["error"]["code"])
        elif chunked:
            dechunk = Dechunker()
            while not dechunk.done:
                data = await reader.read(READ_BYTES)
                if not data:
                    raise ConnectionError("closed mid-body")
                dechunk.feed(data)
        out.errors[code] = out.errors.get(code, 0) + 1
        return b"content-length" in headers or chunked
    dechunk = Dechunker()
    pending = b""
    while True:
        data = await reader.read(READ_BYTES)
        if not data:
            if chunked:
                raise ConnectionError("closed mid-stream")
            break
        payload = dechunk.feed(data) if chunked else data
        pending = _events(payload, pending, state, spec, out, time.time() if spec.delays else 0.0)
        if chunked and dechunk.done:
            break
    ended = time.perf_counter()
    out.chunks += state.chunks
    out.chunks_per_stream[str(state.chunks)] = out.chunks_per_stream.get(str(state.chunks), 0) + 1
    if state.chunks:
        out.ttfc_ms.append((state.first_chunk_at - started) * 1000)
        out.first_chunk_s.append(state.first_chunk_at - run.t0)
    out.total_ms.append((ended - started) * 1000)
    out.requested_s.append(started - run.t0)
    out.ended_s.append(ended - run.t0)
    if state.ended == "done":
        out.completed += 1
    else:
        code = state.ended or "ended without done"
        out.errors[code] = out.errors.get(code, 0) + 1
    return chunked


def _whole(body: bytes, started: float, out: Report) -> bool:
    """A 200 JSON answer: the hub's `Invocation` envelope, or the mock's plain answer."""
    ended = time.perf_counter()
    doc = json.loads(body)
    if "data" in doc:  # the hub's envelope
        data = doc["data"]
        output = data.get("output")
        chunks = len(output["chunks"]) if isinstance(output, dict) and "chunks" in output else 0
        tokens = int(data["tokens_used"])
    else:
        chunks, tokens = 0, int(doc["usage"]["total_tokens"])
    out.chunks += chunks
    out.chunks_per_stream[str(chunks)] = out.chunks_per_stream.get(str(chunks), 0) + 1
    out.tokens_done += tokens
    out.completed += 1
    out.ttfc_ms.append((ended - started) * 1000)  # the whole answer is its first byte
    out.total_ms.append((ended - started) * 1000)
    return True


async def _connection(i: int, run: _Run, host: str, port: int, request: bytes) -> None:
    spec, out = run.spec, run.out
    if spec.ramp:
        await asyncio.sleep(spec.ramp * i / spec.connections)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    for _ in range(spec.per_connection):
        out.streams += 1
        run.open += 1
        out.max_open = max(out.max_open, run.open)
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port, limit=READ_BYTES * 4)
            assert reader is not None
            async with asyncio.timeout(spec.stream_timeout):
                reusable = await _one_stream(reader, writer, request, run)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            key = f"socket {type(exc).__name__}"
            out.errors[key] = out.errors.get(key, 0) + 1
            reusable = False
        finally:
            run.open -= 1
        if not reusable and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def run(spec: Spec) -> Report:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", spec.url)
    assert m, spec.url
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    body = spec.body.encode()

    def request(hdrs: dict[str, str]) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        lines += ["Content-Type: application/json", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    out = Report(started_at=time.time())
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    state = _Run(spec, out, time.perf_counter())
    await asyncio.gather(
        *(
            _connection(i, state, host, port, request(spec.headers[i % len(spec.headers)]))
            for i in range(spec.connections)
        )
    )
    out.seconds = time.perf_counter() - state.t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.cpu_seconds = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return out


def run_streams(spec: Spec) -> Report:
    """Run `spec` in a process of its own; its report."""
    proc = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(asdict(spec)),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the SSE load generator failed:\n{proc.stderr[-3000:]}")
    return Report(**json.loads(proc.stdout))


def _main() -> None:
    spec = Spec(**json.loads(sys.stdin.read()))
    sys.path.insert(0, str(HERE))
    from harness import run_loop

    report: Report = run_loop(run(spec))
    report.errors = dict(Counter(report.errors))
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    _main()

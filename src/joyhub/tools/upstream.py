"""Calling a tool's upstream (API.md §5, "Upstream call"): one shared pool, bounded and retried.

One connection pool per process (`make_transport`: keep-alive, never following redirects, no
cookies, ignoring proxy variables so a stray HTTP_PROXY cannot reroute tool traffic), sending
httpx requests through aiohttp's wire layer (`transport.py`). Each
attempt is bounded as a whole by the tool's `timeout_seconds` (not only per socket operation,
so a server dripping one byte a second cannot hold a call forever). What happens to each answer:

| upstream answer                         | attempt counts against breaker | retried | outcome |
|-----------------------------------------|--------------------------------|---------|---------|
| 2xx JSON ≤ 10 MiB                       | no (success)                   | —       | success |
| 2xx not JSON / over 10 MiB, 1xx/3xx     | no                             | no      | 502     |
| other 4xx                               | no (the upstream is alive)     | no      | 422     |
| 429, 5xx, connection failure            | yes                            | yes     | 503 when exhausted |
| connection dropped after the headers    | yes                            | no (1)  | 502     |
| timeout                                 | yes                            | no      | 504     |

(1) the upstream may already have done the work, so it is not repeated.

Backoff between attempts is exponential with full jitter (uniform in [0, min(2 s, 0.1 s·2ⁿ)]);
an upstream `Retry-After` (seconds or HTTP date) replaces it, capped at 5 s. The body cap is
enforced while streaming (decoded bytes, so a compressed bomb is cut off too), and a declared
Content-Length over the cap is refused before reading anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Literal, Protocol

import anyio.to_thread
import httpx

from joyhub import __version__
from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.egress import EgressPolicy
from joyhub.tools import sse
from joyhub.tools.token_count import Charge, Reported, reported_usage
from joyhub.tools.transport import AiohttpTransport

log = logging.getLogger("joyhub.tools.upstream")

MAX_RESPONSE_BYTES = 10 * 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
ERROR_MESSAGE_CHARS = 500
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 2.0
RETRY_AFTER_CAP_SECONDS = 5.0
THREAD_PARSE_BYTES = 1024 * 1024  # parse bigger bodies off the event loop
STREAM_QUEUE_SIZE = 16  # events read ahead of a slow caller
USER_AGENT = f"joyhub/{__version__}"

Outcome = Literal["success", "rejected", "bad_response", "timeout", "unavailable"]


def make_transport(
    max_connections: int = 4096, egress: EgressPolicy | None = None
) -> httpx.AsyncBaseTransport:
    """The process-wide upstream connection pool (closed by the lifespan).

    Calls go straight to an httpx transport (aiohttp's wire layer, `transport.py` says why)
    rather than through `httpx.AsyncClient`: the client's extras are exactly what the gateway
    must not do — follow redirects, keep and resend cookies (what one caller's call brought back
    would ride along on another caller's call), read proxy variables — and skipping them saves
    a third of the upstream call's CPU. Requests and responses are still httpx's, so headers,
    content decoding and the exception classes are httpx's. `egress` (the app's policy) decides
    which addresses may be connected to.
    """
    return AiohttpTransport(max_connections=max_connections, keepalive_seconds=30.0, egress=egress)


@dataclass(frozen=True)
class Target:
    """What to call: the tool's endpoint and limits as read at admission."""

    url: str
    timeout_seconds: float
    max_attempts: int
    secret_header: tuple[str, str] | None = None
    label: str = ""  # the tool, for metrics


@dataclass
class UpstreamResult:
    outcome: Outcome
    output: Any = None
    output_bytes: int = 0
    attempts: int = 0
    message: str = ""
    upstream_status: int | None = None
    circuit_open: bool = False
    stream: UpstreamStream | None = None  # a streaming tool's answer, its first item read
    charge: Charge | None = None  # set when the count is not the output's own (a collected stream)


class BreakerHooks(Protocol):
    """How the call reports to the circuit breaker."""

    async def failed(self) -> bool:
        """Record one failed attempt; True when the circuit is no longer closed (stop retrying)."""

    async def may_retry(self) -> bool:
        """Asked before every retry: another call may have opened the circuit meanwhile."""


@dataclass
class _Attempt:
    kind: Literal["ok", "retryable", "rejected", "bad", "dropped"]
    output: Any = None
    size: int = 0
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    stream: UpstreamStream | None = None


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"non-standard JSON constant {name}")


def parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN/Infinity); raises ValueError for anything else."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise _NotJson("JSON nested too deeply") from None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - utcnow()).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


def backoff_delay(retry_number: int, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(n-1))] for the n-th retry."""
    return rand() * min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** (retry_number - 1))


def _clean_message(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return text[:ERROR_MESSAGE_CHARS]


def error_message(raw: bytes, status: int) -> str:
    """The upstream's own words from a 4xx body (JSON `message`/`detail`/`error`, else text)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        for key in ("message", "detail", "error", "error_description"):
            val = doc.get(key)
            if isinstance(val, dict):
                val = val.get("message")
            if isinstance(val, str) and val.strip():
                return _clean_message(val)
    return _clean_message(text) or f"The tool rejected the input (HTTP {status})"


async def _read_capped(resp: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """The decoded body up to `cap` bytes; the flag says the body was longer (reading stopped)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > cap:
            return b"", True
        chunks.append(chunk)
    return b"".join(chunks), False


async def _read_success(resp: httpx.Response) -> _Attempt:
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        return _Attempt("bad", status=resp.status_code, message="The tool's response exceeds 10 MiB")
    try:
        raw, too_big = await _read_capped(resp, MAX_RESPONSE_BYTES)
    except httpx.TimeoutException:
        raise
    except httpx.DecodingError:
        return _Attempt("bad", status=resp.status_code, message="The tool's response could not be decoded")
    except httpx.TransportError:
        return _Attempt(
            "dropped", status=resp.status_code, message="The tool dropped the connection mid-response"
        )
    if too_big:
        return _Attempt("bad", status=resp.status_code, message="The tool's response exceeds 10 MiB")
    try:
        if len(raw) > THREAD_PARSE_BYTES:
            output = await anyio.to_thread.run_sync(parse_json, raw)
        else:
            output = parse_json(raw)
    except ValueError:
        return _Attempt("bad", status=resp.status_code, message="The tool's response is not JSON")
    return _Attempt("ok", output=output, size=len(raw), status=resp.status_code)


async def _attempt_once(
    transport: httpx.AsyncBaseTransport, target: Target, body: bytes, headers: dict[str, str]
) -> _Attempt:
    try:
        resp = await transport.handle_async_request(_request(target, body, headers))
        try:
            return await _classify(resp)
        finally:
            await resp.aclose()
    except httpx.TimeoutException:
        raise
    except httpx.TransportError as exc:
        return _connection_failed(exc)


def _request(target: Target, body: bytes, headers: dict[str, str]) -> httpx.Request:
    return httpx.Request(
        "POST",
        parsed_url(target.url),
        content=body,
        headers=headers,
        extensions={"timeout": httpx.Timeout(target.timeout_seconds).as_dict()},
    )


@lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """A tool's URL parsed once, not on every call (httpx copies it into each request: 7 µs less
    per call). Immutable, so one instance serves every request."""
    return httpx.URL(url)


def _connection_failed(exc: Exception) -> _Attempt:
    return _Attempt("retryable", message=f"Connection to the tool failed ({type(exc).__name__})")


async def _classify(resp: httpx.Response) -> _Attempt:
    """What an answer means for the call (the table at the top of this module)."""
    status = resp.status_code
    if 200 <= status < 300:
        return await _read_success(resp)
    if status == 429 or status >= 500:
        return _Attempt(
            "retryable",
            status=status,
            message=f"The tool answered HTTP {status}",
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )
    if 400 <= status < 500:
        try:
            raw, _ = await _read_capped(resp, ERROR_BODY_LIMIT)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError:
            raw = b""
        return _Attempt("rejected", status=status, message=error_message(raw, status))
    return _Attempt("bad", status=status, message=f"The tool answered HTTP {status} (not followed)")


def _headers(target: Target, request_id: str, accept: str) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": accept,
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": USER_AGENT,
        "X-Request-ID": request_id,
    }
    if target.secret_header is not None:
        headers[target.secret_header[0]] = target.secret_header[1]
    return headers


Attempt = Callable[[], Awaitable[_Attempt]]


async def _with_retries(
    target: Target,
    attempt_once: Attempt,
    hooks: BreakerHooks,
    sleep: Callable[[float], Awaitable[None]],
    rand: Callable[[], float],
) -> UpstreamResult:
    """Attempts until one answers, with backoff between them, each reported to the breaker."""
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(target.timeout_seconds):
                res = await attempt_once()
        except (TimeoutError, httpx.TimeoutException):
            metrics.UPSTREAM_LATENCY.labels(target.label).observe(time.perf_counter() - started)
            await hooks.failed()
            return UpstreamResult("timeout", attempts=attempt, message="The tool did not answer in time")
        metrics.UPSTREAM_LATENCY.labels(target.label).observe(time.perf_counter() - started)
        if res.kind == "ok":
            return UpstreamResult(
                "success", output=res.output, output_bytes=res.size, attempts=attempt, stream=res.stream
            )
        if res.kind == "rejected":
            return UpstreamResult(
                "rejected", attempts=attempt, message=res.message, upstream_status=res.status
            )
        if res.kind == "bad":
            return UpstreamResult(
                "bad_response", attempts=attempt, message=res.message, upstream_status=res.status
            )
        opened = await hooks.failed()
        if res.kind == "dropped":
            return UpstreamResult(
                "bad_response",
                attempts=attempt,
                message=res.message,
                upstream_status=res.status,
                circuit_open=opened,
            )
        if opened or attempt >= target.max_attempts:
            return UpstreamResult(
                "unavailable",
                attempts=attempt,
                message=res.message,
                upstream_status=res.status,
                circuit_open=opened,
            )
        delay = res.retry_after if res.retry_after is not None else backoff_delay(attempt, rand)
        await sleep(delay)
        if not await hooks.may_retry():
            return UpstreamResult(
                "unavailable",
                attempts=attempt,
                message=res.message,
                upstream_status=res.status,
                circuit_open=True,
            )


async def call(
    transport: httpx.AsyncBaseTransport,
    target: Target,
    body: bytes,
    request_id: str,
    hooks: BreakerHooks,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> UpstreamResult:
    """POST `body` to the tool with retries; never raises for upstream behaviour."""
    headers = _headers(target, request_id, "application/json")
    return await _with_retries(
        target, lambda: _attempt_once(transport, target, body, headers), hooks, sleep, rand
    )


# ---------------------------------------------------------------------------------------------
# Streaming tools (API.md §5.1)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One event of a streaming tool: its JSON text on one line, and the usage it reports."""

    data: bytes
    usage: int | None  # `usage.total_tokens` (or `tokens_used`) when this chunk carries one
    reported: Reported | None = None  # that count with its prompt/completion split


@dataclass(frozen=True)
class StreamEnd:
    """`data: [DONE]`, or the end of the body."""


@dataclass(frozen=True)
class StreamBroken:
    """The stream failed after it started: what to tell the caller."""

    message: str


StreamItem = Chunk | StreamEnd | StreamBroken


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _chunk(data: bytes) -> Chunk | StreamBroken:
    try:
        doc = _DECODER.decode(data.decode("utf-8"))  # SSE is UTF-8; one decoder for every chunk
    except (ValueError, RecursionError):
        return StreamBroken("The tool's stream sent an event that is not JSON")
    if not isinstance(doc, dict):
        return StreamBroken("The tool's stream sent an event that is not a JSON object")
    reported = reported_usage(doc)
    return Chunk(sse.one_line(data), reported.total if reported is not None else None, reported)


class UpstreamStream:
    """A streaming tool's answer being read: a task reads the body as it arrives, parses its
    events and hands them over through a small queue (`next`), so the reader waits while the
    caller is slow (nothing is buffered whole) and `next` can be waited on with any timeout — a
    wait that times out loses nothing. `aclose` stops the reading and closes the connection at
    once (the upstream sees it)."""

    def __init__(self, response: httpx.Response | None, items: list[StreamItem] | None = None) -> None:
        self._response = response
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue(STREAM_QUEUE_SIZE)
        for item in items or ():
            self._queue.put_nowait(item)
        self._first: StreamItem | None = None
        self._reader: asyncio.Task[None] | None = None
        if response is not None:
            self._reader = asyncio.create_task(self._read(response))

    @classmethod
    def of(cls, items: list[StreamItem]) -> UpstreamStream:
        """A stream already complete: a streaming tool that answered plain JSON (one chunk)."""
        return cls(None, items)

    def with_first(self, item: StreamItem) -> UpstreamStream:
        """Put back the item the opening attempt read (the first `next` returns it)."""
        self._first = item
        return self

    async def next(self) -> StreamItem:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        return await self._queue.get()

    def ready(self) -> bool:
        """Whether `next_nowait` has an item (read already, waiting in the queue)."""
        return self._first is not None or not self._queue.empty()

    def next_nowait(self) -> StreamItem:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        return self._queue.get_nowait()

    async def _read(self, response: httpx.Response) -> None:
        reader = sse.EventReader()
        size = 0
        try:
            async for piece in response.aiter_bytes():
                for data in reader.feed(piece):
                    if data == sse.DONE:
                        await self._queue.put(StreamEnd())
                        return
                    item = _chunk(data)
                    size += len(data)
                    if size > MAX_RESPONSE_BYTES:
                        item = StreamBroken("The tool's stream exceeds 10 MiB")
                    await self._queue.put(item)
                    if isinstance(item, StreamBroken):
                        return
            await self._queue.put(StreamEnd())
        except httpx.DecodingError:
            await self._queue.put(StreamBroken("The tool's stream could not be decoded"))
        except httpx.ReadTimeout:
            # silent past the tool's timeout: that is the relay's to call, by its own idle timer
            # counted from the last chunk it relayed (TOOL_TIMEOUT). The socket's timer, counted
            # from the last read, can fire a moment earlier under load — not a broken stream.
            return
        except httpx.TransportError:
            await self._queue.put(StreamBroken("The tool dropped the connection mid-stream"))
        except Exception:  # whatever the stream held, the relay must hear that it broke
            log.exception("reading a tool's stream failed")
            await self._queue.put(StreamBroken("The tool's stream could not be read"))

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._response is not None:
            await self._response.aclose()  # unread bytes: the connection is closed, not reused


def _is_event_stream(resp: httpx.Response) -> bool:
    content_type: str = resp.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


async def _open_once(
    transport: httpx.AsyncBaseTransport, target: Target, body: bytes, headers: dict[str, str]
) -> _Attempt:
    """One attempt at a streaming tool: the answer's headers and its first event (both within
    the attempt's timeout). A 2xx event stream is kept open for the caller to read on."""
    try:
        resp = await transport.handle_async_request(_request(target, body, headers))
    except httpx.TimeoutException:
        raise
    except httpx.TransportError as exc:
        return _connection_failed(exc)
    if not (200 <= resp.status_code < 300 and _is_event_stream(resp)):
        try:
            found = await _classify(resp)
        finally:
            await resp.aclose()
        if found.kind != "ok":
            return found
        # plain JSON from a streaming tool: its whole answer is one chunk
        item = _chunk(sse.compact(found.output))
        if isinstance(item, StreamBroken):
            return _Attempt("bad", status=found.status, message=item.message)
        return _Attempt("ok", status=found.status, stream=UpstreamStream.of([item, StreamEnd()]))
    stream = UpstreamStream(resp)
    try:
        first = await stream.next()
    except BaseException:  # the attempt's timeout
        await stream.aclose()
        raise
    if isinstance(first, StreamBroken):
        await stream.aclose()
        return _Attempt("dropped", status=resp.status_code, message=first.message)
    return _Attempt("ok", status=resp.status_code, stream=stream.with_first(first))


async def open_stream(
    transport: httpx.AsyncBaseTransport,
    target: Target,
    body: bytes,
    request_id: str,
    hooks: BreakerHooks,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> UpstreamResult:
    """POST `body` to a streaming tool with §5's retries, up to its first event: `success` with
    `stream` open (its first item waiting), or the failure, never raised."""
    headers = _headers(target, request_id, "text/event-stream")
    return await _with_retries(
        target, lambda: _open_once(transport, target, body, headers), hooks, sleep, rand
    )


class Upstream:
    """The process's upstream client: one pool (`make_transport`), the calls made through it.

    Built once in the lifespan and injected into the gateway, which never reaches for a global.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport if transport is not None else make_transport()

    @classmethod
    def with_pool(cls, max_connections: int, egress: EgressPolicy | None = None) -> Upstream:
        return cls(make_transport(max_connections, egress))

    async def call(self, target: Target, body: bytes, request_id: str, hooks: BreakerHooks) -> UpstreamResult:
        """POST `body` to the tool with retries (`call`); never raises for upstream behaviour."""
        return await call(self.transport, target, body, request_id, hooks)

    async def open_stream(
        self, target: Target, body: bytes, request_id: str, hooks: BreakerHooks
    ) -> UpstreamResult:
        """A streaming tool's answer, open up to its first event (`open_stream`)."""
        return await open_stream(self.transport, target, body, request_id, hooks)

    async def aclose(self) -> None:
        await self.transport.aclose()

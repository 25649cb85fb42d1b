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
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import anyio.to_thread
import httpx

from joyhub import __version__
from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.egress import EgressPolicy
from joyhub.tools.transport import AiohttpTransport

MAX_RESPONSE_BYTES = 10 * 1024 * 1024
ERROR_BODY_LIMIT = 64 * 1024
ERROR_MESSAGE_CHARS = 500
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 2.0
RETRY_AFTER_CAP_SECONDS = 5.0
THREAD_PARSE_BYTES = 1024 * 1024  # parse bigger bodies off the event loop
USER_AGENT = f"joyhub/{__version__}"

Outcome = Literal["success", "rejected", "bad_response", "timeout", "unavailable"]


def make_transport(egress: EgressPolicy | None = None) -> httpx.AsyncBaseTransport:
    """The process-wide upstream connection pool (closed by the lifespan).

    Calls go straight to an httpx transport (aiohttp's wire layer, `transport.py` says why)
    rather than through `httpx.AsyncClient`: the client's extras are exactly what the gateway
    must not do — follow redirects, keep and resend cookies (what one caller's call brought back
    would ride along on another caller's call), read proxy variables — and skipping them saves
    a third of the upstream call's CPU. Requests and responses are still httpx's, so headers,
    content decoding and the exception classes are httpx's. `egress` (the app's policy) decides
    which addresses may be connected to.
    """
    return AiohttpTransport(max_connections=512, keepalive_seconds=30.0, egress=egress)


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
        request = httpx.Request(
            "POST",
            target.url,
            content=body,
            headers=headers,
            extensions={"timeout": httpx.Timeout(target.timeout_seconds).as_dict()},
        )
        resp = await transport.handle_async_request(request)
        try:
            return await _classify(resp)
        finally:
            await resp.aclose()
    except httpx.TimeoutException:
        raise
    except httpx.TransportError as exc:
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
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": USER_AGENT,
        "X-Request-ID": request_id,
    }
    if target.secret_header is not None:
        headers[target.secret_header[0]] = target.secret_header[1]
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(target.timeout_seconds):
                res = await _attempt_once(transport, target, body, headers)
        except (TimeoutError, httpx.TimeoutException):
            metrics.UPSTREAM_LATENCY.labels(target.label).observe(time.perf_counter() - started)
            await hooks.failed()
            return UpstreamResult("timeout", attempts=attempt, message="The tool did not answer in time")
        metrics.UPSTREAM_LATENCY.labels(target.label).observe(time.perf_counter() - started)
        if res.kind == "ok":
            return UpstreamResult("success", output=res.output, output_bytes=res.size, attempts=attempt)
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

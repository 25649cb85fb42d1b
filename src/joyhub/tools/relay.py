"""A streamed invocation relayed to its caller, metered for exactly what the caller received
(API.md §5.1).

The router sends what `next_frame` hands out and says `sent()` once a frame is written to the
caller's connection; a chunk counts only then. So the charge is what the caller received: the
upstream's reported usage when a relayed chunk carried one (the last one seen), else
`ceil((input bytes + relayed chunk bytes) / 4)`.

How a stream ends, and what it is settled as (one settle statement, run in a task of the
gateway's and shielded, so no cancellation can leave it half done or undone):

| how                                        | caller gets                   | usage record  | breaker   |
|--------------------------------------------|-------------------------------|---------------|-----------|
| the upstream's `[DONE]` or end of body     | `event: done`                 | success       | success   |
| tokens relayed reach those left at admission | `event: error` QUOTA_EXCEEDED | error         | success   |
| no chunk within the tool's timeout         | `event: error` TOOL_TIMEOUT   | timeout       | failure   |
| TOOL_STREAM_MAX_SECONDS reached            | `event: error` TOOL_TIMEOUT   | timeout       | success   |
| the upstream breaks (dropped, not JSON, 10 MiB) | `event: error` TOOL_BAD_RESPONSE | error   | failure   |
| the caller hangs up                        | —                             | cancelled     | success   |
| the server shuts down (grace period over)  | `event: error` SERVICE_UNAVAILABLE | cancelled | success   |

In every case the upstream connection is closed first, at once. While the upstream is silent the
caller gets a `: ping` comment every STREAM_PING_SECONDS. With an Idempotency-Key the events sent
(pings aside) are kept and stored by the settle, so a repeat replays the same stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.errors import (
    AppError,
    QuotaExceeded,
    ServiceUnavailable,
    ToolBadResponse,
    ToolTimeout,
)
from joyhub.tools import sse, token_count
from joyhub.tools.breaker import Permit
from joyhub.tools.metering import Admission, SettleRequest
from joyhub.tools.stream_format import HUB_EVENTS, StreamFormat, StreamSummary
from joyhub.tools.upstream import Chunk, StreamBroken, StreamEnd, UpstreamStream

if TYPE_CHECKING:
    from joyhub.tools.gateway import Gateway

log = logging.getLogger("joyhub.tools.gateway")

EVENT_STREAM = "text/event-stream"
MAX_FRAME_CHUNKS = 32  # chunks already read go to the caller in one write


@dataclass(frozen=True)
class _Ending:
    """How the stream ended: the usage record's status, the caller's error (None: done) and
    whether the upstream is to blame (a circuit-breaker failure)."""

    status: str
    label: str  # the outcome in `joyhub_tool_invocations_total`
    error: AppError | None = None
    upstream_failed: bool = False


_DONE = _Ending("success", "success")
_CANCELLED = _Ending("cancelled", "cancelled")


@dataclass
class StreamRelay:
    gateway: Gateway
    admission: Admission
    permit: Permit
    stream: UpstreamStream
    input_bytes: int
    keep_events: bool  # an Idempotency-Key: the events are stored for a replay
    started: float  # time.monotonic() when the call was admitted
    max_seconds: float
    ping_seconds: float
    format: StreamFormat = HUB_EVENTS  # how events are written for the caller (`stream_format.py`)
    # what the caller has received
    relayed_bytes: int = 0
    reported: int | None = None  # the last usage a relayed chunk reported
    reported_split: token_count.Reported | None = None  # and its prompt/completion split
    _pending: list[Chunk] = field(default_factory=list)  # handed out, not yet confirmed sent
    _held: StreamEnd | StreamBroken | None = None  # read while batching chunks; next in line
    _kept: list[bytes] = field(default_factory=list)
    _last_chunk_at: float = 0.0
    _ended: bool = False

    @property
    def tool_key(self) -> str:
        return str(self.admission.tool.id)

    @property
    def invocation_id(self) -> str:
        return str(self.admission.log_id)

    def charge(self) -> token_count.Charge:
        """What the caller received, as tokens (API.md §5.1, "Metering a stream")."""
        if self.reported_split is not None:
            return self.reported_split.charge()
        if self.reported is not None:
            return token_count.Charge(self.reported, "reported")
        return token_count.Charge(token_count.estimate(self.input_bytes, self.relayed_bytes), "estimated")

    @property
    def deadline(self) -> float:
        """When the stream must be over (TOOL_STREAM_MAX_SECONDS), in the event loop's time."""
        return asyncio.get_running_loop().time() + (self.started + self.max_seconds - time.monotonic())

    def sent(self) -> None:
        """The frame `next_frame` handed out is written to the caller's connection."""
        chunks, self._pending = self._pending, []
        for chunk in chunks:
            self.relayed_bytes += len(chunk.data)
            if chunk.usage is not None:
                self.reported = chunk.usage
                self.reported_split = chunk.reported
            if self.keep_events:
                self._kept.append(self.format.chunk(chunk))

    def _spent(self, pending: Sequence[Chunk]) -> bool:
        """Whether the caller, once `pending` reaches them too, has received the tokens that were
        left at admission (the stream is cut there: overshoot of at most one chunk)."""
        size = self.relayed_bytes + sum(len(chunk.data) for chunk in pending)
        if not size:
            return False
        reported = next((c.usage for c in reversed(pending) if c.usage is not None), self.reported)
        tokens = reported if reported is not None else token_count.estimate(self.input_bytes, size)
        return tokens >= self.admission.tokens_left

    async def next_frame(self) -> bytes | None:
        """The next frame for the caller — the chunks already read, up to MAX_FRAME_CHUNKS, in one
        write — or None when the stream is over (its last frame, `done` or `error`, was handed out
        after the settle)."""
        if self._ended:
            return None
        if self._spent(()):
            cut = QuotaExceeded("No tokens left in this billing period")
            return await self._end(_Ending("error", "quota_cut", cut))
        item = await self._next_item()
        if isinstance(item, bytes):  # a ping, or the frame that ends the stream
            return item
        if isinstance(item, Chunk):
            chunks = [item]
            while len(chunks) < MAX_FRAME_CHUNKS and self.stream.ready() and not self._spent(chunks):
                following = self.stream.next_nowait()
                if not isinstance(following, Chunk):
                    self._held = following  # the end comes after these chunks are sent
                    break
                chunks.append(following)
            self._pending = chunks
            self._last_chunk_at = time.monotonic()
            return b"".join(self.format.chunk(chunk) for chunk in chunks)
        if isinstance(item, StreamEnd):
            return await self._end(_DONE)
        return await self._end(
            _Ending("error", "bad_response", ToolBadResponse(item.message), upstream_failed=True)
        )

    async def _next_item(self) -> Chunk | StreamEnd | StreamBroken | bytes:
        """The upstream's next item, a ping when it is silent for a while, or the end of a
        stream that ran out of time (its final frame)."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        if self.stream.ready():  # already read: no timer to arm
            return self.stream.next_nowait()
        now = time.monotonic()
        if not self._last_chunk_at:
            self._last_chunk_at = now
        idle_deadline = self._last_chunk_at + self.admission.tool.timeout_seconds
        total_deadline = self.started + self.max_seconds
        wait = min(self.ping_seconds, idle_deadline - now, total_deadline - now)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await self.stream.next()
        except TimeoutError:
            pass
        now = time.monotonic()
        if now >= total_deadline:
            error = ToolTimeout("The stream ran longer than the hub allows")
            return await self._end(_Ending("timeout", "timeout", error))
        if now >= idle_deadline:
            error = ToolTimeout("The tool sent nothing within its timeout")
            return await self._end(_Ending("timeout", "timeout", error, upstream_failed=True))
        return sse.PING

    async def abort(self, *, shutdown: bool) -> bytes | None:
        """The caller hung up (or the server is shutting down): close the upstream at once and
        settle as `cancelled` with what was relayed; on shutdown, the frame to tell the caller."""
        if self._ended:
            return None
        ending = _CANCELLED
        if shutdown:
            cut = ServiceUnavailable("The hub is shutting down; the stream was cut")
            ending = _Ending("cancelled", "cancelled", cut)
        return await self._end(ending)

    async def expire(self) -> None:
        """The caller stopped reading and the stream reached TOOL_STREAM_MAX_SECONDS meanwhile:
        close the upstream, settle as `timeout` with what was relayed (nothing more can be said
        to a caller who does not read)."""
        if not self._ended:
            await self._end(_Ending("timeout", "caller_stalled", ToolTimeout("The caller stopped reading")))

    async def _end(self, ending: _Ending) -> bytes:
        self._ended = True
        # one task, shielded: a caller cancelled meanwhile cannot stop the close or the settle
        return await asyncio.shield(self.gateway.track(self._close_and_settle(ending)))

    async def _close_and_settle(self, ending: _Ending) -> bytes:
        try:
            await self.stream.aclose()  # the upstream sees its connection closed now
        except Exception:  # the settle below must happen whatever closing did
            log.exception("could not close a stream's upstream connection")
        charge = self.charge()
        duration_ms = int((time.monotonic() - self.started) * 1000)
        error = ending.error
        summary = StreamSummary(self.invocation_id, self.tool_key, charge.tokens, charge.source, duration_ms)
        last = self.format.done(summary) if error is None else self.format.error(error, summary)
        await self._report_to_breaker(ending)
        metrics.INVOCATIONS.labels(self.tool_key, ending.label).inc()
        if ending.status != "success":
            log.info(
                "stream ended early",
                extra={
                    "tool_id": self.tool_key,
                    "invocation_id": self.invocation_id,
                    "outcome": ending.status,
                    "code": error.code if error else None,
                    "tokens": charge.tokens,
                },
            )
        await self.gateway.store.settle(
            SettleRequest(
                admission=self.admission,
                status=ending.status,
                tokens=charge.tokens,
                token_source=charge.source,
                duration_ms=duration_ms,
                error_code=error.code if error is not None else None,
                now=utcnow(),
                input_tokens=charge.input_tokens,
                output_tokens=charge.output_tokens,
                response_status=200,
                response_body=b"".join([*self._kept, last]) if self.keep_events else b"",
                media_type=EVENT_STREAM,
            )
        )
        return last

    async def _report_to_breaker(self, ending: _Ending) -> None:
        breakers, permit = self.gateway.breakers, self.permit
        try:
            if ending.upstream_failed:
                await breakers.record_failure(self.tool_key, trial=permit.trial)
            else:
                await breakers.record_success(self.tool_key, trial=permit.trial, clean=permit.clean)
        except Exception:  # the breaker's state is advisory; the settle must happen regardless
            log.exception("could not report a stream's end to the circuit breaker")

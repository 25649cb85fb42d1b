"""What the gateway is asked, and what it answers (DESIGN.md, "The gateway core, next shape").

`Gateway.invoke` takes an `InvocationRequest` and returns `Completed` or `Replay`, or raises an
`AppError` — a refusal before the call (nothing charged, nothing logged) or a failed call (logged,
0 tokens), both carrying their quota headers. The router renders them; nothing here knows HTTP
frameworks.

An answer's body is rendered once, by a `Presenter`, *before* the settle: the same bytes are sent
and stored under the call's Idempotency-Key, so a replay is byte-identical. The JSON API's
presenter is the envelope (`core/envelope.py`); another protocol brings its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.envelope import encode_envelope, error_document
from joyhub.core.errors import AppError
from joyhub.tools.metering import Quota
from joyhub.tools.protocols import Operation
from joyhub.tools.rate_limits import NO_LIMITS, Limits
from joyhub.tools.stream_format import HUB_EVENTS, StreamFormat

if TYPE_CHECKING:
    from joyhub.tools.relay import StreamRelay


@dataclass(frozen=True)
class InvocationRequest:
    credential: Credential
    tool_id: uuid.UUID
    input: dict[str, Any]
    idempotency_key: str | None
    stream: bool = False  # relay a streaming tool's events as they arrive (API.md §5.1)
    operation: Operation | None = None  # an openai tool's endpoint (API.md §12); None: chat


@dataclass(frozen=True)
class CallResult:
    """A successful call, as the caller is told about it (API.md §5 `Invocation`)."""

    invocation_id: uuid.UUID
    tool_id: uuid.UUID
    output: Any
    tokens_used: int
    duration_ms: int


class Presenter(Protocol):
    """Renders an invocation's answer body (once: it is sent and stored for replay), and the
    events of a streamed one (`stream_format`)."""

    @property
    def stream_format(self) -> StreamFormat: ...

    def completed(self, result: CallResult) -> bytes: ...

    def failed(self, error: AppError) -> bytes: ...


class EnvelopePresenter:
    """The JSON API's answers: the envelope of API.md §1, and §5.1's events."""

    stream_format: StreamFormat = HUB_EVENTS

    def completed(self, result: CallResult) -> bytes:
        return encode_envelope(
            data={
                "invocation_id": str(result.invocation_id),
                "tool_id": str(result.tool_id),
                "status": "success",
                "output": result.output,
                "tokens_used": result.tokens_used,
                "duration_ms": result.duration_ms,
            }
        )

    def failed(self, error: AppError) -> bytes:
        return encode_envelope(error=error_document(error.code, error.message, error.details))


ENVELOPE = EnvelopePresenter()


def quota_headers(quota: Quota | None) -> dict[str, str]:
    return quota.headers() if quota is not None else {}


def account_headers(quota: Quota | None, limits: Limits) -> dict[str, str]:
    """What every invoke answer to a subscriber carries: `X-Quota-*` and, when a per-minute limit
    applies, `X-RateLimit-*` (API.md §4.1, §5)."""
    return {**quota_headers(quota), **limits.headers(utcnow())}


@dataclass(frozen=True)
class Completed:
    """A call made and settled; `body` is the presenter's rendering of its `CallResult`."""

    result: CallResult
    body: bytes
    quota: Quota | None
    limits: Limits = NO_LIMITS
    status: int = 200

    def headers(self) -> dict[str, str]:
        return account_headers(self.quota, self.limits)


@dataclass(frozen=True)
class Replay:
    """The stored first answer to a repeated Idempotency-Key, sent again as it was (a streamed
    call's answer is its events, `text/event-stream`)."""

    status: int
    body: bytes
    quota: Quota | None
    media_type: str = "application/json"
    limits: Limits = NO_LIMITS

    def headers(self) -> dict[str, str]:
        return {**account_headers(self.quota, self.limits), "Idempotent-Replayed": "true"}


@dataclass(frozen=True)
class Stream:
    """A streamed call under way: its first event has arrived; `relay` hands out the events for
    the caller and meters what the caller received (`relay.py`)."""

    relay: StreamRelay
    quota: Quota | None
    limits: Limits = NO_LIMITS

    def headers(self) -> dict[str, str]:
        return account_headers(self.quota, self.limits)


Outcome = Completed | Replay | Stream

"""How a relayed stream's events are written for the caller: one format per protocol.

The relay (`relay.py`) meters and times a stream the same way whatever its caller speaks; what it
writes differs. The JSON API's callers get API.md §5.1's events (`HUB_EVENTS`: `event: chunk`
per upstream chunk, then `event: done` or `event: error`); the OpenAI surface writes OpenAI's own
chunk stream (`openai/presenter.py`). A format may withhold a chunk (an empty frame): it is still
counted as received — withholding is the format's choice, not the caller's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from joyhub.core.errors import AppError
from joyhub.tools import sse
from joyhub.tools.upstream import Chunk


@dataclass(frozen=True)
class StreamSummary:
    """What the last frame of a stream says about the call."""

    invocation_id: str
    tool_id: str
    tokens_used: int
    token_source: str
    duration_ms: int


class StreamFormat(Protocol):
    def chunk(self, chunk: Chunk) -> bytes:
        """The frame of one upstream chunk (b"" to withhold it)."""

    def done(self, summary: StreamSummary) -> bytes:
        """The frame that ends a stream that ended well."""

    def error(self, error: AppError, summary: StreamSummary) -> bytes:
        """The frame that ends a stream cut by `error`."""


class HubEvents:
    """API.md §5.1's events."""

    def chunk(self, chunk: Chunk) -> bytes:
        return sse.frame("chunk", chunk.data)

    def done(self, summary: StreamSummary) -> bytes:
        return sse.frame(
            "done",
            sse.compact(
                {
                    "invocation_id": summary.invocation_id,
                    "tool_id": summary.tool_id,
                    "status": "success",
                    "tokens_used": summary.tokens_used,
                    "token_source": summary.token_source,
                    "duration_ms": summary.duration_ms,
                }
            ),
        )

    def error(self, error: AppError, summary: StreamSummary) -> bytes:
        return sse.frame(
            "error",
            sse.compact(
                {
                    "code": error.code,
                    "message": error.message,
                    "invocation_id": summary.invocation_id,
                    "tokens_used": summary.tokens_used,
                }
            ),
        )


HUB_EVENTS = HubEvents()

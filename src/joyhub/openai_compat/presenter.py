"""Answers on the OpenAI surface (API.md §12): the upstream's own body, unchanged but for `model`
(the tool's name, the caller's model id); streams as OpenAI's chunk stream (`data: {chunk}` …
`data: [DONE]`), the usage chunk passed on only when the caller asked for it
(`stream_options.include_usage`) — the hub always asks the upstream, to bill what it reports.

Rendered once per answer (`tools/outcomes.Presenter`): the bytes sent are the bytes an
Idempotency-Key replays.
"""

from __future__ import annotations

import json
from typing import Any

from joyhub.core.errors import AppError
from joyhub.openai_compat.errors import error_body
from joyhub.tools import sse
from joyhub.tools.outcomes import CallResult
from joyhub.tools.stream_format import StreamFormat, StreamSummary
from joyhub.tools.upstream import Chunk

DONE = b"data: [DONE]\n\n"


class OpenAIChunks:
    """OpenAI's stream format (`tools/stream_format.StreamFormat`)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        # an upstream chunk already naming the tool's model needs no re-encoding (the common case)
        self._named = b'"model":' + json.dumps(model).encode()

    def chunk(self, chunk: Chunk) -> bytes:
        data = chunk.data
        if chunk.usage is not None and not self.include_usage:
            doc = json.loads(data)
            if not doc.get("choices"):
                return b""  # the usage-only chunk the caller did not ask for
            doc.pop("usage", None)
            data = self._renamed(doc)
        elif b'"model"' in data and self._named not in data:
            data = self._renamed(json.loads(data))
        return b"data: " + data + b"\n\n"

    def _renamed(self, doc: Any) -> bytes:
        if isinstance(doc, dict) and "model" in doc:
            doc["model"] = self.model
        return sse.compact(doc)

    def done(self, summary: StreamSummary) -> bytes:
        return DONE

    def error(self, error: AppError, summary: StreamSummary) -> bytes:
        """A failure after the first chunk: an `error` event the SDKs raise as `APIError`."""
        return b"data: " + error_body(error.status, error.code, error.message, []) + b"\n\n"


class OpenAIPresenter:
    """`tools/outcomes.Presenter` for the OpenAI surface."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model
        self._chunks = OpenAIChunks(model, include_usage)

    @property
    def stream_format(self) -> StreamFormat:
        return self._chunks

    def completed(self, result: CallResult) -> bytes:
        output = result.output
        if isinstance(output, dict) and output.get("model", self.model) != self.model:
            output = {**output, "model": self.model}
        return sse.compact(output)

    def failed(self, error: AppError) -> bytes:
        return error_body(error.status, error.code, error.message, error.details)

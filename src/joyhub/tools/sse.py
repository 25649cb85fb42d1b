"""Server-Sent Events, both ways (API.md §5.1): reading a streaming tool's answer, and the frames
the hub relays to its caller.

Reading: `EventReader.feed(bytes)` takes the body as it arrives, in pieces of any size, and
returns the `data` of every event completed so far (an event ends at a blank line; several
`data:` lines are joined with a newline; comments, `event:`, `id:` and `retry:` lines are not
needed by the hub and skipped). Lines may end in CRLF, LF or CR, even split across pieces.

Why by hand rather than a library (`httpx-sse`, `sse-starlette`): the hub relays every chunk of
every stream, and its budget is a few microseconds of CPU per chunk. The reader works on bytes,
splits on event boundaries only and never decodes text, which a line-by-line text parser over
`aiter_lines` cannot match; the whole of what the hub needs of SSE is the thirty lines below.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"[DONE]"
PING = b": ping\n\n"


class EventReader:
    """Incremental SSE parser: bytes in, each complete event's `data` (bytes) out."""

    __slots__ = ("_buffer", "_held_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._held_cr = False

    def feed(self, piece: bytes) -> list[bytes]:
        if self._held_cr:  # a CR that ended the last piece: it may be half of a CRLF
            piece = b"\r" + piece
            self._held_cr = False
        if b"\r" in piece:
            if piece.endswith(b"\r"):
                piece, self._held_cr = piece[:-1], True
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + piece if self._buffer else piece
        if b"\n\n" not in buffer:
            self._buffer = buffer
            return []
        *events, self._buffer = buffer.split(b"\n\n")
        out: list[bytes] = []
        for event in events:
            data = _data_of(event)
            if data is not None:
                out.append(data)
        return out


def _data_of(event: bytes) -> bytes | None:
    """The event's data (its `data:` lines joined), or None when it has none (not dispatched)."""
    if event.startswith(b"data:") and b"\n" not in event:  # the common case: one data line
        value = event[5:]
        return value[1:] if value.startswith(b" ") else value
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


def frame(event: str, data: bytes) -> bytes:
    """One event for the caller. `data` is one line of JSON (the caller's parser sees one event)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def one_line(data: bytes) -> bytes:
    """A chunk as one line of JSON: an upstream's multi-line JSON is re-encoded compactly."""
    if b"\n" not in data:
        return data
    return compact(json.loads(data))


def compact(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # lone surrogates (an upstream's): ASCII escapes are still JSON
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()

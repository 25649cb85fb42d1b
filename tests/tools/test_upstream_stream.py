"""How the reader of a tool's stream reports what the transport raises (`UpstreamStream._read`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from joyhub.tools.upstream import Chunk, StreamBroken, UpstreamStream


class _Body(httpx.AsyncByteStream):
    """One event, then the transport's exception."""

    def __init__(self, exc: Exception) -> None:
        self._exc = exc

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"text": "one"}\n\n'
        raise self._exc


async def _read_all(exc: Exception) -> tuple[object, UpstreamStream]:
    stream = UpstreamStream(httpx.Response(200, stream=_Body(exc)))
    first = await asyncio.wait_for(stream.next(), 5)
    assert stream._reader is not None
    await asyncio.wait_for(stream._reader, 5)  # the reader has finished with the exception
    return first, stream


async def test_a_read_timeout_mid_stream_is_left_to_the_relay_idle_timer() -> None:
    """The socket's read timer can fire a moment before the relay's idle timer (counted from the
    last chunk relayed, not read): the stream then reports nothing, so the relay ends it as
    TOOL_TIMEOUT, not as a broken stream."""
    first, stream = await _read_all(httpx.ReadTimeout("silent"))
    assert isinstance(first, Chunk)
    assert not stream.ready()
    await stream.aclose()


async def test_a_dropped_connection_mid_stream_is_a_broken_stream() -> None:
    first, stream = await _read_all(httpx.RemoteProtocolError("dropped"))
    assert isinstance(first, Chunk)
    assert isinstance(stream.next_nowait(), StreamBroken)
    await stream.aclose()

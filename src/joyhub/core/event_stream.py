"""An HTTP response that relays Server-Sent Events as they are produced (API.md §5.1).

Starlette's `StreamingResponse` notices a caller who hung up only when its next write fails —
a silent upstream would keep the stream (and its upstream connection, and its metering) alive for
up to a ping interval. This response also watches the connection: on `http.disconnect` it stops
at once, whatever it is waiting for, and tells its source, which closes the upstream and settles
what the caller received.

The source (`FrameSource`) hands out frames, is told when each was written, and is told when the
stream stops early — because the caller left, because the server is shutting down (the request's
task is cancelled once uvicorn's graceful period is over; the source may give one last frame to
send), or because a caller who stopped reading held a write past the stream's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send


class FrameSource(Protocol):
    @property
    def deadline(self) -> float:
        """When the stream must be over, in the event loop's time (`loop.time()`)."""

    async def next_frame(self) -> bytes | None:
        """The next frame, or None when the stream is over."""

    def sent(self) -> None:
        """The frame last handed out is written to the caller's connection."""

    async def abort(self, *, shutdown: bool) -> bytes | None:
        """The stream stops early; on shutdown, a last frame for the caller (or None)."""

    async def expire(self) -> None:
        """The stream ran past its deadline while its caller was not reading: end it as it is."""


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, source: FrameSource, headers: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.status_code = 200
        self.background = None
        self.init_headers({**(headers or {}), "Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        relaying = True

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if relaying:  # interrupt whatever the relay waits for
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while (frame := await self.source.next_frame()) is not None:
                # a caller who stops reading must not hold the stream past its deadline: the
                # write waits while their socket is full, and nothing else would end it
                async with asyncio.timeout_at(self.source.deadline):
                    await send(_body(frame, more=True))
                self.source.sent()
            await send(_body(b"", more=False))
            relaying = False
        except TimeoutError:
            await self.source.expire()  # settled with what was relayed; the connection is dropped
        except (asyncio.CancelledError, OSError) as exc:
            caller_left = gone.is_set() or isinstance(exc, OSError)
            last = await self.source.abort(shutdown=not caller_left)
            if caller_left:
                if isinstance(exc, asyncio.CancelledError):
                    task.uncancel()  # our own cancellation: the request simply ends
                return
            if last is not None:  # the server is shutting down: say so, best effort
                with contextlib.suppress(Exception):
                    await send(_body(last, more=False))
            raise
        finally:
            relaying = False
            watcher.cancel()


def _body(data: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}

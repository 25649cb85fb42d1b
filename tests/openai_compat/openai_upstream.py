"""A real OpenAI-compatible server on loopback for the surface's tests (API.md §12): the demo's
deterministic models (`joyhub.demo_models`: vLLM/OpenAI chunk format, `include_usage` with the
final usage-only chunk whose `choices` is empty), served by uvicorn over TCP in the test's loop.

Its base URL carries the scenario as a path segment, since the hub appends the operation to a
tool's `api_endpoint`: `<url>/<scenario>/v1` + `/chat/completions` | `/completions` |
`/embeddings`. Scenarios: `ok`; `slow` (streams wait `SLOW_SECONDS` before each chunk);
`fail` (HTTP 500); `reject` (HTTP 400 with OpenAI's error body). Every request body is kept
(`bodies`), and every stream's end (`streams`: `done` or `closed early`).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from joyhub import demo_models

SLOW_SECONDS = 0.15


@dataclass
class OpenAIUpstream:
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)  # "done" | "closed early", in order of ending
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def base(self, scenario: str = "ok") -> str:
        return f"{self.url}/{scenario}/v1"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{scenario}/v1/{operation:path}")
        async def serve(scenario: str, operation: str, request: Request) -> Response:
            body = json.loads(await request.body())
            self.bodies.append(body)
            self.paths.append(f"/{operation}")
            if scenario == "fail":
                return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
            if scenario == "reject":
                error = {
                    "message": "This model's maximum context length is 8 tokens",
                    "type": "invalid_request_error",
                }
                return JSONResponse({"error": error}, 400)
            if operation == "embeddings":
                return JSONResponse(demo_models.embeddings(body))
            chat = operation == "chat/completions"
            if not body.get("stream"):
                return JSONResponse(demo_models.completion(body, chat=chat))
            return StreamingResponse(self._events(body, chat, scenario), media_type="text/event-stream")

        return app

    async def _events(self, body: dict[str, Any], chat: bool, scenario: str) -> AsyncIterator[bytes]:
        ended = "closed early"
        try:
            for chunk in demo_models.chunks(body, chat=chat):
                if scenario == "slow":
                    await asyncio.sleep(SLOW_SECONDS)
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            ended = "done"
        finally:
            self.streams.append(ended)

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app(), lifespan="off", log_config=None, access_log=False)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        async with asyncio.timeout(10):
            while not self._server.started:
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task

    async def wait_streams(self, count: int, timeout: float = 5.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while len(self.streams) < count:
                await asyncio.sleep(0.01)
        return self.streams

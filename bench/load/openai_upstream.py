"""A fast OpenAI-compatible upstream for bench/openai_bench.py, in a process of its own (raw
asyncio + uvloop, HTTP/1.1 keep-alive): `POST /v1/chat/completions` answers a fixed chat
completion with `usage` (prompt 9 + completion 14 = 23 tokens); with `"stream": true` the same
answer as 14 `chat.completion.chunk`s (chunked transfer encoding, all at once), then — when the
body asks `stream_options.include_usage` — the usage-only chunk with empty `choices` (vLLM's and
OpenAI's shape), then `data: [DONE]`.

Run:  python bench/load/openai_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

WORDS = [
    "The",
    "hub",
    "meters",
    "every",
    "token",
    "it",
    "relays",
    "and",
    "this",
    "is",
    "the",
    "benchmark",
    "answer",
    ".",
]
USAGE = {"prompt_tokens": 9, "completion_tokens": len(WORDS), "total_tokens": 9 + len(WORDS)}
TOKENS_PER_CALL = USAGE["total_tokens"]


def _completion() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1765000000,
            "model": "bench-llm",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(WORDS)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        },
        separators=(",", ":"),
    ).encode()


def _chunk(payload: dict[str, object]) -> bytes:
    event = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


def _stream(include_usage: bool) -> bytes:
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1765000000,
        "model": "bench-llm",
    }
    parts = []
    for i, word in enumerate(WORDS):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
        finish = "stop" if i == len(WORDS) - 1 else None
        chunk: dict[str, object] = {
            **base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if include_usage:
            chunk["usage"] = None
        parts.append(_chunk(chunk))
    if include_usage:
        parts.append(_chunk({**base, "choices": [], "usage": USAGE}))
    done = b"data: [DONE]\n\n"
    parts.append(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
    return b"".join(parts)


BODY = _completion()
PLAIN = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
STREAM_WITH_USAGE = SSE_HEAD + _stream(True)
STREAM_WITHOUT_USAGE = SSE_HEAD + _stream(False)


async def _conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if b'"stream":true' in body.replace(b" ", b""):
                usage = b'"include_usage":true' in body.replace(b" ", b"")
                writer.write(STREAM_WITH_USAGE if usage else STREAM_WITHOUT_USAGE)
            else:
                writer.write(PLAIN)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_conn, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(serve(int(sys.argv[1])))
    except ImportError:
        asyncio.run(serve(int(sys.argv[1])))

"""Streamed invocations (API.md §5.1), end to end over real HTTP: a real loopback SSE upstream,
the hub served by uvicorn on loopback, callers reading (and hanging up on) the stream.

What every test checks at the end: the call is logged once with the right status, token count
and token source, and `tokens_used` = Σ logs = rollups with nothing reserved or in flight
(`assert_settled`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.live_hub import LiveHubFactory
from tests.tools.helpers import (
    API,
    Caller,
    assert_settled,
    make_caller,
    make_tool,
    run_sql,
    sub_state,
    usage_logs,
)
from tests.tools.sse_upstream import SseUpstream

pytestmark = pytest.mark.integration

INPUT = {"text": "stream me"}
INPUT_BYTES = len(json.dumps(INPUT, separators=(",", ":")).encode())


@pytest.fixture
async def sse() -> AsyncIterator[SseUpstream]:
    server = SseUpstream()
    await server.start()
    yield server
    await server.stop()


def chunk_bytes(i: int, **extra: Any) -> int:
    """The size of the upstream's event `i` as the hub relays it (one line of JSON)."""
    return len(json.dumps({"index": i, "text": f"w{i}", **extra}).encode())


async def read_events(
    response: httpx.Response, *, stop_after_chunks: int | None = None
) -> list[tuple[str, Any]]:
    """(event, data) pairs as they arrive; comments as ("comment", text)."""
    events: list[tuple[str, Any]] = []
    name, data = "message", []
    chunks = 0
    async for line in response.aiter_lines():
        if line.startswith(":"):
            events.append(("comment", line[1:].strip()))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            chunks += name == "chunk"
            name, data = "message", []
            if stop_after_chunks is not None and chunks >= stop_after_chunks:
                break
    return events


async def stream_call(
    client: httpx.AsyncClient,
    caller: Caller,
    tool: uuid.UUID,
    *,
    key: str | None = None,
    stop_after_chunks: int | None = None,
    value: dict[str, Any] | None = None,
) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    headers = dict(caller.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = {"input": INPUT if value is None else value, "stream": True}
    async with client.stream("POST", f"{API}/tools/{tool}/invoke", json=body, headers=headers) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            events = await read_events(r, stop_after_chunks=stop_after_chunks)
        else:
            await r.aread()
            events = []
    return r, events


def kinds(events: list[tuple[str, Any]]) -> list[str]:
    return [name for name, _ in events if name != "comment"]


async def _streaming_tool(engine: AsyncEngine, sse: SseUpstream, query: str, **fields: Any) -> uuid.UUID:
    return await make_tool(engine, sse.url(f"/sse?{query}"), streaming=True, **fields)


@pytest.mark.parametrize(
    ("query", "tokens", "source"),
    [
        ("usage=last&tokens=11", 11, "reported"),
        ("usage=middle&tokens=13", 13, "reported"),
        ("usage=last_only&tokens=17", 17, "reported"),  # OpenAI's final usage-only chunk
        ("usage=none", None, "estimated"),
        ("usage=none&end=eof", None, "estimated"),  # a plain end of body instead of [DONE]
        ("usage=last&tokens=5&crlf=1", 5, "reported"),
    ],
)
async def test_a_stream_is_relayed_in_order_and_charged_once(
    live_hub: LiveHubFactory,
    engine: AsyncEngine,
    sse: SseUpstream,
    query: str,
    tokens: int | None,
    source: str,
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, f"key=s&n=5&every=0.005&{query}")
    r, events = await stream_call(hub.client, caller, tool)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["X-Quota-Limit"] == "50000"
    names = kinds(events)
    chunk_count = 6 if "last_only" in query else 5
    assert names == ["chunk"] * chunk_count + ["done"]
    assert [data["index"] for name, data in events if name == "chunk" and "index" in data] == list(range(5))
    if tokens is None:  # ceil((input bytes + relayed chunk bytes) / 4)
        tokens = math.ceil((INPUT_BYTES + sum(chunk_bytes(i) for i in range(5))) / 4)
    done = events[-1][1]
    assert (done["status"], done["tokens_used"], done["token_source"]) == ("success", tokens, source)
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", tokens)]
    assert str(logs[0].id) == done["invocation_id"]
    await _assert_source(engine, logs[0].id, source)
    await assert_settled(engine, caller)


async def _assert_source(engine: AsyncEngine, log_id: uuid.UUID, source: str) -> None:
    async with engine.connect() as conn:
        found = (
            await conn.execute(text("SELECT token_source FROM usage_logs WHERE id = :i"), {"i": log_id})
        ).scalar_one()
    assert found == source


async def test_a_failure_before_the_first_chunk_is_a_plain_json_error_costing_nothing(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    slow = await _streaming_tool(engine, sse, "key=slow&first=3", timeout_seconds=1)
    r, _ = await stream_call(hub.client, caller, slow)
    assert r.status_code == 504 and r.json()["error"]["code"] == "TOOL_TIMEOUT"
    flaky = await _streaming_tool(engine, sse, "key=flaky&fail=2&n=2", max_attempts=3)
    r, events = await stream_call(hub.client, caller, flaky)  # retried before the first chunk
    assert r.status_code == 200 and kinds(events) == ["chunk", "chunk", "done"]
    assert sse.hits["flaky"] == 3
    down = await _streaming_tool(engine, sse, "key=down&fail=9", max_attempts=2)
    r, _ = await stream_call(hub.client, caller, down)
    assert r.status_code == 503 and r.json()["error"]["code"] == "TOOL_UNAVAILABLE"
    logs = await usage_logs(engine, caller.user_id)
    assert sorted((log.status, log.tokens_used) for log in logs) == [
        ("error", 0),
        ("success", 11),
        ("timeout", 0),
    ]
    await assert_settled(engine, caller)


async def test_a_slow_first_chunk_within_the_timeout_streams(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=s&first=0.4&n=2", timeout_seconds=2)
    r, events = await stream_call(hub.client, caller, tool)
    assert r.status_code == 200 and kinds(events) == ["chunk", "chunk", "done"]
    await assert_settled(engine, caller)


@pytest.mark.parametrize(
    ("query", "code", "status", "relayed"),
    [
        ("die_at=3", "TOOL_BAD_RESPONSE", "error", 3),  # the upstream dies mid-stream
        ("bad_at=2", "TOOL_BAD_RESPONSE", "error", 2),  # an event that is not JSON
        ("gap_at=2&gap=3", "TOOL_TIMEOUT", "timeout", 2),  # silent past the tool's timeout
    ],
)
async def test_a_failure_after_the_first_chunk_ends_the_stream_and_charges_what_was_relayed(
    live_hub: LiveHubFactory,
    engine: AsyncEngine,
    sse: SseUpstream,
    query: str,
    code: str,
    status: str,
    relayed: int,
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, f"key=f&n=6&usage=none&{query}", timeout_seconds=1)
    r, events = await stream_call(hub.client, caller, tool)
    assert r.status_code == 200
    assert kinds(events) == ["chunk"] * relayed + ["error"]
    error = events[-1][1]
    tokens = math.ceil((INPUT_BYTES + sum(chunk_bytes(i) for i in range(relayed))) / 4)
    assert (error["code"], error["tokens_used"]) == (code, tokens)
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used, log.error_code) for log in logs] == [(status, tokens, code)]
    await assert_settled(engine, caller)


async def test_a_caller_who_hangs_up_is_charged_for_what_they_got_and_the_upstream_is_closed(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=gone&n=100&every=0.3&usage=none", timeout_seconds=5)
    _, events = await stream_call(hub.client, caller, tool, stop_after_chunks=3)
    hung_up = asyncio.get_running_loop().time()
    assert kinds(events) == ["chunk"] * 3
    seen = await sse.wait_closed("gone")
    assert seen.closed_by_peer_at is not None and seen.closed_by_peer_at - hung_up < 1.0
    assert seen.sent < 10  # the upstream stopped being read at once
    tokens = math.ceil((INPUT_BYTES + sum(chunk_bytes(i) for i in range(3))) / 4)
    logs = await _settled_logs(engine, caller, 1)
    assert [(log.status, log.tokens_used) for log in logs] == [("cancelled", tokens)]
    await assert_settled(engine, caller)


async def _settled_logs(engine: AsyncEngine, caller: Caller, count: int) -> list[Any]:
    """The caller's logs once `count` are settled (the hub settles a hung-up stream on its own)."""
    async with asyncio.timeout(10):
        while True:
            logs = await usage_logs(engine, caller.user_id)
            if len(logs) >= count and all(log.status != "pending" for log in logs):
                return logs
            await asyncio.sleep(0.02)


async def test_a_stream_is_cut_at_the_tokens_left_at_admission(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "free", tokens_used=970)  # 30 tokens left
    tool = await _streaming_tool(engine, sse, "key=cut&n=50&every=0.002&usage=none&pad=36")
    r, events = await stream_call(hub.client, caller, tool)
    assert r.status_code == 200
    names = kinds(events)
    assert names[-1] == "error" and events[-1][1]["code"] == "QUOTA_EXCEEDED"
    relayed = names.count("chunk")
    per_chunk = chunk_bytes(0, pad="p" * 36) / 4
    charged = events[-1][1]["tokens_used"]
    assert 30 <= charged < 30 + per_chunk + 2  # overshoot by at most one chunk
    assert relayed < 50
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.error_code, log.tokens_used) for log in logs] == [
        ("error", "QUOTA_EXCEEDED", charged)
    ]
    await assert_settled(engine, caller, baseline=970)
    r, _ = await stream_call(hub.client, caller, tool)  # nothing left now
    assert r.status_code == 429 and r.json()["error"]["code"] == "QUOTA_EXCEEDED"


async def test_the_relayed_bytes_are_capped_at_10_mib(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "enterprise")
    async with engine.begin() as conn:  # enough tokens for 10 MiB of chunks
        await conn.execute(text("UPDATE plans SET token_limit = 100000000 WHERE code = 'enterprise'"))
    tool = await _streaming_tool(engine, sse, "key=big&n=130&every=0&usage=none&pad=100000")
    _, events = await stream_call(hub.client, caller, tool)
    names = kinds(events)
    assert names[-1] == "error" and events[-1][1]["code"] == "TOOL_BAD_RESPONSE"
    assert names.count("chunk") * 100_000 <= 10 * 1024 * 1024
    await assert_settled(engine, caller)


async def test_a_silent_upstream_gets_pings_and_a_stream_has_a_longest_run(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub(stream_ping_seconds=0.1, tool_stream_max_seconds=1.5)
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=p&n=3&gap_at=1&gap=0.5&usage=none", timeout_seconds=2)
    _, events = await stream_call(hub.client, caller, tool)
    assert ("comment", "ping") in events  # kept alive during the silence
    assert kinds(events) == ["chunk"] * 3 + ["done"]
    endless = await _streaming_tool(engine, sse, "key=e&n=1000&every=0.05&usage=none", timeout_seconds=2)
    _, events = await stream_call(hub.client, caller, endless)
    assert kinds(events)[-1] == "error" and events[-1][1]["code"] == "TOOL_TIMEOUT"
    logs = await usage_logs(engine, caller.user_id)
    assert sorted(log.status for log in logs) == ["success", "timeout"]
    await assert_settled(engine, caller)


async def test_an_idempotent_repeat_replays_the_finished_stream(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=idem&n=4&every=0.005")
    headers = {**caller.headers, "Idempotency-Key": "stream-1"}
    body = {"input": INPUT, "stream": True}
    first = await hub.client.post(f"{API}/tools/{tool}/invoke", json=body, headers=headers)
    again = await hub.client.post(f"{API}/tools/{tool}/invoke", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"].startswith("text/event-stream")
    assert again.content == first.content and b"event: done" in again.content
    assert sse.hits["idem"] == 1  # no second upstream call
    plain = await hub.client.post(f"{API}/tools/{tool}/invoke", json={"input": INPUT}, headers=headers)
    assert plain.status_code == 409  # the same key for a different request
    assert len(await usage_logs(engine, caller.user_id)) == 1
    await assert_settled(engine, caller)


async def test_a_plain_call_to_a_streaming_tool_gets_the_chunks_whole(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub()
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=whole&n=3&every=0.005&tokens=9")
    r = await hub.client.post(f"{API}/tools/{tool}/invoke", json={"input": INPUT}, headers=caller.headers)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [c["index"] for c in data["output"]["chunks"]] == [0, 1, 2]
    assert data["tokens_used"] == 9
    plain = await make_tool(engine, sse.url("/sse?json=1&key=j"))  # not a streaming tool
    r = await hub.client.post(
        f"{API}/tools/{plain}/invoke", json={"input": INPUT, "stream": True}, headers=caller.headers
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.stream"
    json_answer = await _streaming_tool(engine, sse, "json=1&key=j2&tokens=4")  # streams nothing
    r, events = await stream_call(hub.client, caller, json_answer)
    assert kinds(events) == ["chunk", "done"] and events[-1][1]["tokens_used"] == 4
    await assert_settled(engine, caller)


async def test_shutdown_ends_running_streams_and_settles_them_cancelled(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hub = await live_hub(graceful_seconds=0.5)
    caller = await make_caller(engine, "pro")
    tool = await _streaming_tool(engine, sse, "key=down&n=100&every=0.1&usage=none", timeout_seconds=5)
    body = {"input": INPUT, "stream": True}
    async with hub.client.stream(
        "POST", f"{API}/tools/{tool}/invoke", json=body, headers=caller.headers
    ) as r:
        lines = r.aiter_lines()
        assert (await anext(lines)).startswith("event: chunk")
        stopping = asyncio.create_task(hub.stop())
        rest = [line async for line in lines]
    await stopping
    assert "event: error" in rest
    error = json.loads(rest[rest.index("event: error") + 1][5:])
    assert error["code"] == "SERVICE_UNAVAILABLE"
    logs = await _settled_logs(engine, caller, 1)
    assert [log.status for log in logs] == ["cancelled"]
    assert logs[0].tokens_used == error["tokens_used"] > 0
    await assert_settled(engine, caller)


async def test_200_streams_with_random_hang_ups_on_two_instances_stay_exact(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    hubs = [await live_hub(), await live_hub()]
    callers = [await make_caller(engine, "pro") for _ in range(4)]
    tool = await _streaming_tool(engine, sse, "n=8&every=0.01&usage=none", timeout_seconds=5)
    rng = random.Random(7)

    async def one(i: int) -> None:
        hub, caller = hubs[i % 2], callers[i % 4]
        stop = rng.choice([None, None, 1, 2, 4])
        await stream_call(hub.client, caller, tool, stop_after_chunks=stop)

    await asyncio.gather(*(one(i) for i in range(200)))
    for caller in callers:
        logs = await _settled_logs(engine, caller, 50)
        assert len(logs) == 50
        assert {log.status for log in logs} <= {"success", "cancelled"}
        assert {log.status for log in logs} == {"success", "cancelled"}  # both kinds happened
        await assert_settled(engine, caller)
        assert (await sub_state(engine, caller.user_id)).tokens_used > 0


async def test_a_caller_who_stops_reading_cannot_hold_a_stream_past_its_longest_run(
    live_hub: LiveHubFactory, engine: AsyncEngine, sse: SseUpstream
) -> None:
    """The review's case: a caller keeps the connection but reads nothing, so the hub's writes
    wait on a full socket. At TOOL_STREAM_MAX_SECONDS the stream ends anyway: the upstream is
    closed, the call settled (`timeout`) and charged for what reached the socket."""
    hub = await live_hub(tool_stream_max_seconds=1.5)
    caller = await make_caller(engine, "enterprise")
    await run_sql(engine, "UPDATE plans SET token_limit = 100000000 WHERE code = 'enterprise'")
    tool = await _streaming_tool(
        engine, sse, "key=stall&n=2000&every=0&usage=none&pad=20000", timeout_seconds=5
    )
    host, port = hub.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"input": INPUT, "stream": True}).encode()
    auth = caller.headers["Authorization"]
    writer.write(
        f"POST {API}/tools/{tool}/invoke HTTP/1.1\r\nHost: hub\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")  # ... and then nothing is read
    seen = await sse.wait_closed("stall", timeout=10)
    assert seen.closed_by_peer_at is not None and seen.sent < 2000
    logs = await _settled_logs(engine, caller, 1)
    assert [(log.status, log.error_code) for log in logs] == [("timeout", "TOOL_TIMEOUT")]
    assert 0 < logs[0].tokens_used < 2000 * 20000 / 4
    writer.close()
    await assert_settled(engine, caller)

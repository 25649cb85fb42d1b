"""The OpenAI-compatible surface (API.md §12), driven by the official `openai` SDK — sync and
async, streaming and not — against the hub served over real HTTP, in front of a real
OpenAI-compatible upstream on loopback (`openai_upstream.py`, vLLM/OpenAI chunk format).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub import demo_models
from tests.live_hub import LiveHub, LiveHubFactory
from tests.openai_compat.openai_upstream import OpenAIUpstream
from tests.tools.helpers import Caller, assert_settled, make_caller, make_tool, run_sql
from tests.usage.factories import make_api_key

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi there"}]


class Setup:
    """A hub, an openai tool in front of the loopback upstream, and a caller with an API key."""

    def __init__(self, hub: LiveHub, caller: Caller, key: str, model: str, tool_id: uuid.UUID) -> None:
        self.hub, self.caller, self.key, self.model, self.tool_id = hub, caller, key, model, tool_id

    @property
    def base_url(self) -> str:
        return f"{self.hub.url}/api/v1/openai"

    def sync_client(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=20)

    def async_client(self, key: str | None = None) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=20)


async def _setup(
    engine: AsyncEngine,
    live_hub: LiveHubFactory,
    upstream: OpenAIUpstream,
    *,
    scenario: str = "ok",
    plan: str = "pro",
    **tool: Any,
) -> Setup:
    hub = await live_hub()
    model = f"llm-{uuid.uuid4().hex[:6]}"
    fields: dict[str, Any] = {"name": model, "protocol": "openai", "upstream_model": "upstream-llm-7b"}
    fields.update(tool)
    tool_id = await make_tool(engine, upstream.base(scenario), **fields)
    caller = await make_caller(engine, plan)
    key = await make_api_key(engine, caller.user_id)
    return Setup(hub, caller, key, model, tool_id)


async def _logs(engine: AsyncEngine, user_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT status, tokens_used, token_source, input_tokens, output_tokens, error_code"
                " FROM usage_logs WHERE user_id = :u ORDER BY started_at"
            ),
            {"u": user_id},
        )
        return list(result.all())


# -- answers ---------------------------------------------------------------------------------


async def test_sync_chat_completion_is_the_upstreams_answer_with_the_hubs_model_id(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream, requests_per_minute=100)

    def call() -> Any:
        return s.sync_client().chat.completions.with_raw_response.create(model=s.model, messages=HI)

    raw = await asyncio.to_thread(call)
    answer = raw.parse()
    expected = demo_models.completion({"model": "x", "messages": HI})
    assert answer.model == s.model  # not the upstream's id
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.usage is not None and answer.usage.total_tokens == expected["usage"]["total_tokens"]
    # the upstream got the OpenAI body with its own model id, at <base>/chat/completions
    assert oai_upstream.paths == ["/chat/completions"]
    assert oai_upstream.bodies[0] == {"model": "upstream-llm-7b", "messages": HI}
    # metered by the reported usage, with its split
    usage = expected["usage"]
    assert await _logs(engine, s.caller.user_id) == [
        (
            "success",
            usage["total_tokens"],
            "reported",
            usage["prompt_tokens"],
            usage["completion_tokens"],
            None,
        )
    ]
    for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-Quota-Remaining"):
        assert header in raw.headers, header
    assert (raw.headers["X-RateLimit-Limit"], raw.headers["X-RateLimit-Remaining"]) == ("100", "99")
    await assert_settled(engine, s.caller)


async def test_async_stream_relays_chunks_and_the_usage_chunk_when_asked(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    async with s.async_client() as client:
        stream = await client.chat.completions.create(
            model=s.model, messages=HI, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    expected = demo_models.chunks({"model": "x", "messages": HI, "stream_options": {"include_usage": True}})
    assert len(chunks) == len(expected)
    assert all(c.model == s.model for c in chunks)
    text_ = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text_ == " ".join(demo_models.answer_words({"messages": HI}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == expected[-1]["usage"]["total_tokens"]
    assert oai_upstream.bodies[0]["stream_options"] == {"include_usage": True}
    usage = expected[-1]["usage"]
    assert await _logs(engine, s.caller.user_id) == [
        (
            "success",
            usage["total_tokens"],
            "reported",
            usage["prompt_tokens"],
            usage["completion_tokens"],
            None,
        )
    ]
    await assert_settled(engine, s.caller)


async def test_sync_stream_without_include_usage_hides_the_usage_chunk_but_bills_it(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)

    def call() -> list[Any]:
        with s.sync_client() as client:
            return list(client.chat.completions.create(model=s.model, messages=HI, stream=True))

    chunks = await asyncio.to_thread(call)
    assert chunks and all(c.choices for c in chunks)  # no usage-only chunk reached the caller
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the hub asked the upstream for usage all the same, and billed what it reported
    assert oai_upstream.bodies[0]["stream"] is True
    assert oai_upstream.bodies[0]["stream_options"] == {"include_usage": True}
    usage = demo_models.completion({"messages": HI})["usage"]
    assert await _logs(engine, s.caller.user_id) == [
        (
            "success",
            usage["total_tokens"],
            "reported",
            usage["prompt_tokens"],
            usage["completion_tokens"],
            None,
        )
    ]


async def test_text_completions_and_embeddings_billed_by_reported_usage(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    async with s.async_client() as client:
        done = await client.completions.create(model=s.model, prompt="Once upon a time", max_tokens=5)
        emb = await client.embeddings.create(model=s.model, input=["one two three", "four five"])
    assert done.model == s.model and done.choices[0].text == "Hello! You said: Once upon"
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == demo_models.EMBED_DIMENSIONS
    assert emb.usage.total_tokens == 5
    assert oai_upstream.paths == ["/completions", "/embeddings"]
    logs = await _logs(engine, s.caller.user_id)
    assert logs[1] == ("success", 5, "reported", 5, None, None)  # embeddings: no completion tokens
    assert logs[0][:3] == ("success", done.usage.total_tokens if done.usage else -1, "reported")
    await assert_settled(engine, s.caller)


# -- errors: the SDK's typed exceptions -------------------------------------------------------


async def test_a_bad_key_is_authentication_error(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    async with s.async_client("jfui_" + "x" * 40) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=s.model, messages=HI)
        assert caught.value.code == "invalid_api_key"
        # the unknown model does not tell an anonymous caller anything: 401 first
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="no-such-model", messages=HI)
    assert oai_upstream.bodies == []


async def test_unknown_inactive_or_json_model_is_not_found(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    plain = await make_tool(engine, "http://127.0.0.1:9/run")  # a JSON tool: not a model
    async with engine.connect() as conn:
        plain_name = (
            await conn.execute(text("SELECT name FROM tools WHERE id = :i"), {"i": plain})
        ).scalar_one()
    async with s.async_client() as client:
        for model in ("no-such-model", plain_name):
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model=model, messages=HI)
            assert caught.value.code == "model_not_found"
            body = caught.value.body
            assert isinstance(body, dict)
            assert (body["type"], body["param"], body["code"]) == (
                "invalid_request_error",
                None,
                "model_not_found",
            )
        await client.chat.completions.create(model=s.model, messages=HI)  # known (and cached) …
        await run_sql(engine, "UPDATE tools SET is_active = false WHERE id = :i", i=s.tool_id)
        with pytest.raises(openai.NotFoundError):  # … deactivated: refused at once all the same
            await client.chat.completions.create(model=s.model, messages=HI)
    assert len(oai_upstream.bodies) == 1


async def test_quota_used_up_is_rate_limit_error_insufficient_quota(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream, plan="free")
    await run_sql(
        engine, "UPDATE subscriptions SET tokens_used = 1000 WHERE user_id = :u", u=s.caller.user_id
    )
    async with s.async_client() as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=s.model, messages=HI)
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert oai_upstream.bodies == []


async def test_rate_limit_is_rate_limit_error_with_retry_after(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream, requests_per_minute=1)
    async with s.async_client() as client:
        await client.chat.completions.create(model=s.model, messages=HI)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=s.model, messages=HI)
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert len(oai_upstream.bodies) == 1


async def test_no_subscription_is_402_and_upstream_failures_keep_their_statuses(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    stranger = await make_caller(engine, plan=None)
    async with s.async_client(await make_api_key(engine, stranger.user_id)) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=s.model, messages=HI)
    assert caught.value.status_code == 402 and caught.value.code == "subscription_required"
    failing = await make_tool(engine, oai_upstream.base("fail"), protocol="openai", max_attempts=1)
    rejecting = await make_tool(engine, oai_upstream.base("reject"), protocol="openai")
    async with engine.connect() as conn:
        names = dict((await conn.execute(text("SELECT id, name FROM tools"))).all())
    async with s.async_client() as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model=names[failing], messages=HI)
        with pytest.raises(openai.UnprocessableEntityError) as rejected:
            await client.chat.completions.create(model=names[rejecting], messages=HI)
    assert failed.value.status_code == 503 and failed.value.code == "tool_unavailable"
    assert "maximum context length" in rejected.value.message
    assert [r[0] for r in await _logs(engine, s.caller.user_id)] == ["error", "error"]


async def test_validation_errors_and_other_routes_keep_their_shapes(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    auth = {"Authorization": f"Bearer {s.key}"}
    r = await s.hub.client.post("/api/v1/openai/chat/completions", json={"model": s.model}, headers=auth)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "messages" and r.json()["error"]["type"] == "invalid_request_error"
    r = await s.hub.client.post(
        "/api/v1/openai/chat/completions",
        content=b"{nope",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and set(r.json()) == {"error"}
    big = b'{"model": "x", "messages": [], "pad": "' + b"x" * (1024 * 1024) + b'"}'
    r = await s.hub.client.post(
        "/api/v1/openai/chat/completions", content=big, headers={**auth, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # the rest of the API keeps the envelope
    r = await s.hub.client.get("/api/v1/tools/" + str(uuid.uuid4()), headers=auth)
    assert r.status_code == 404 and set(r.json()) == {"data", "error", "meta"}


# -- streams the caller abandons, idempotency, usage views -------------------------------------


async def test_a_client_abandoning_a_stream_is_charged_what_it_received_and_logged_cancelled(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream, scenario="slow")
    async with s.async_client() as client:
        stream = await client.chat.completions.create(model=s.model, messages=HI, stream=True)
        received = []
        async for chunk in stream:
            received.append(chunk)
            if len(received) == 2:
                break
        await stream.close()  # the caller hangs up mid-stream
    assert await oai_upstream.wait_streams(1) == ["closed early"]  # the hub closed the upstream at once
    async with asyncio.timeout(5):
        while not (logs := await _logs(engine, s.caller.user_id)) or logs[0][0] == "pending":
            await asyncio.sleep(0.02)
    status, tokens, source, tin, tout, _ = logs[0]
    assert (status, source, tin, tout) == ("cancelled", "estimated", None, None)
    # what was relayed, estimated from its bytes: less than the whole stream would have cost
    whole = sum(len(json.dumps(c)) for c in demo_models.chunks({"model": "upstream-llm-7b", "messages": HI}))
    assert 1 <= tokens < whole // 4
    await assert_settled(engine, s.caller)


async def test_idempotency_key_replays_without_calling_again(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    headers = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    async with s.async_client() as client:
        first = await client.chat.completions.with_raw_response.create(
            model=s.model, messages=HI, extra_headers=headers
        )
        again = await client.chat.completions.with_raw_response.create(
            model=s.model, messages=HI, extra_headers=headers
        )
        with pytest.raises(openai.ConflictError):  # the same key, another request
            await client.chat.completions.create(
                model=s.model, messages=[{"role": "user", "content": "else"}], extra_headers=headers
            )
    assert first.parse().id == again.parse().id
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(oai_upstream.bodies) == 1
    assert len(await _logs(engine, s.caller.user_id)) == 1


async def test_input_and_output_tokens_in_history_export_and_summary(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    async with s.async_client() as client:
        one = await client.chat.completions.create(model=s.model, messages=HI)
        two = await client.chat.completions.create(model=s.model, messages=HI, max_tokens=3)
    assert one.usage is not None and two.usage is not None
    hub, headers = s.hub.client, s.caller.headers
    records = (await hub.get("/api/v1/usage", headers=headers)).json()["data"]
    assert sorted((r["input_tokens"], r["output_tokens"]) for r in records) == sorted(
        (u.prompt_tokens, u.completion_tokens) for u in (one.usage, two.usage)
    )
    export = (await hub.get("/api/v1/usage/export", headers=headers)).text
    rows = list(csv.DictReader(io.StringIO(export)))
    assert sorted(int(r["output_tokens"]) for r in rows) == sorted(
        u.completion_tokens for u in (one.usage, two.usage)
    )
    summary = (await hub.get("/api/v1/usage/summary", headers=headers)).json()["data"]
    (by_tool,) = summary["by_tool"]
    assert by_tool["input_tokens"] == one.usage.prompt_tokens + two.usage.prompt_tokens
    assert by_tool["output_tokens"] == one.usage.completion_tokens + two.usage.completion_tokens
    assert by_tool["tokens"] == one.usage.total_tokens + two.usage.total_tokens


async def test_models_lists_the_openai_tools_the_plan_may_use(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    premium = f"big-{uuid.uuid4().hex[:6]}"
    await make_tool(engine, oai_upstream.base(), name=premium, protocol="openai", min_plan_code="enterprise")
    await make_tool(engine, "http://127.0.0.1:9/run")  # not a model
    async with s.async_client() as client:
        ids = [m.id async for m in client.models.list()]
        assert s.model in ids and premium not in ids
        assert (await client.models.retrieve(s.model)).id == s.model
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(premium)  # not on this plan
    assert all(m.startswith(("llm-", "big-", "demo-")) for m in ids)
    async with httpx.AsyncClient() as anonymous:
        r = await anonymous.get(f"{s.base_url}/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_a_repeated_idempotency_key_replays_a_stream_as_it_was_sent(
    engine: AsyncEngine, live_hub: LiveHubFactory, oai_upstream: OpenAIUpstream
) -> None:
    s = await _setup(engine, live_hub, oai_upstream)
    headers = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    answers = []
    async with s.async_client() as client:
        for _ in range(2):
            stream = await client.chat.completions.create(
                model=s.model,
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
            )
            answers.append([chunk.model_dump() async for chunk in stream])
    assert answers[0] == answers[1] and answers[0][-1]["usage"] is not None
    assert len(oai_upstream.bodies) == 1  # replayed, not called again
    assert [log[0] for log in await _logs(engine, s.caller.user_id)] == ["success"]
    await assert_settled(engine, s.caller)

"""Idempotency keys (API.md §5, guarantee 4): replay, conflicts, parallel repeats, expiry."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, sub_state, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def test_replay_returns_the_first_response_without_a_second_call_or_charge(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast?tokens=11"))
    caller = await make_caller(engine, "pro")
    first = await invoke(client, caller, tool, {"text": "a"}, key="key-1")
    second = await invoke(client, caller, tool, {"text": "a"}, key="key-1")
    assert first.status_code == second.status_code == 200
    assert second.content == first.content  # same body, byte for byte
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["X-Quota-Remaining"] == str(50_000 - 11)
    assert upstream.count("/fast?tokens=11") == 1
    assert (await sub_state(engine, caller.user_id)).tokens_used == 11
    assert len(await usage_logs(engine, caller.user_id)) == 1
    await assert_settled(engine, caller)


async def test_failed_first_response_is_replayed_too(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/status?code=400&msg=no"))
    caller = await make_caller(engine, "pro")
    first = await invoke(client, caller, tool, key="k-fail")
    second = await invoke(client, caller, tool, key="k-fail")
    assert first.status_code == second.status_code == 422
    assert first.content == second.content
    assert upstream.count("/status?code=400&msg=no") == 1


async def test_same_key_different_input_or_tool_is_a_conflict(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    other = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "a"}, key="k")).status_code == 200
    r = await invoke(client, caller, tool, {"text": "b"}, key="k")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "IDEMPOTENCY_CONFLICT")
    r = await invoke(client, caller, other, {"text": "a"}, key="k")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "IDEMPOTENCY_CONFLICT")
    # key order in the input does not matter (canonical JSON)
    r = await invoke(client, caller, tool, {"text": "a"}, key="k")
    assert r.status_code == 200
    assert upstream.count("/fast") == 1
    assert len(await usage_logs(engine, caller.user_id)) == 1


async def test_keys_are_per_user(client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    a = await make_caller(engine, "pro")
    b = await make_caller(engine, "pro")
    assert (await invoke(client, a, tool, key="shared")).status_code == 200
    assert (await invoke(client, b, tool, key="shared")).status_code == 200
    assert upstream.count("/fast") == 2


async def test_ten_parallel_repeats_make_one_call_and_one_charge(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/slow?delay=0.3&tokens=13"
    tool = await make_tool(engine, upstream.url(target))
    caller = await make_caller(engine, "pro")
    responses = await asyncio.gather(*(invoke(client, caller, tool, key="same") for _ in range(10)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 409}
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    bodies = {r.content for r in responses if r.status_code == 200}
    assert len(bodies) == 1  # replays are the first response
    assert upstream.count(target) == 1
    assert (await sub_state(engine, caller.user_id)).tokens_used == 13
    assert len(await usage_logs(engine, caller.user_id)) == 1
    # once it has finished, every repeat replays it
    r = await invoke(client, caller, tool, key="same")
    assert r.status_code == 200
    assert r.content in bodies
    await assert_settled(engine, caller)


async def test_repeat_while_running_is_a_conflict(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/slow?delay=0.5"
    tool = await make_tool(engine, upstream.url(target))
    caller = await make_caller(engine, "pro")
    first = asyncio.create_task(invoke(client, caller, tool, key="running"))
    while upstream.count(target) == 0:
        await asyncio.sleep(0.01)
    r = await invoke(client, caller, tool, key="running")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "IDEMPOTENCY_CONFLICT")
    assert "progress" in r.json()["error"]["message"]
    assert (await first).status_code == 200


async def test_refusals_do_not_claim_the_key(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "free", tokens_used=1000)
    r = await invoke(client, caller, tool, key="after-upgrade")
    assert r.status_code == 429
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE subscriptions SET tokens_used = 0 WHERE user_id = :u"), {"u": caller.user_id}
        )
    r = await invoke(client, caller, tool, key="after-upgrade")
    assert r.status_code == 200


async def test_expired_key_can_be_used_again(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro", period_days=365)
    assert (await invoke(client, caller, tool, {"text": "a"}, key="old")).status_code == 200
    async with engine.begin() as conn:  # 24 h later (moving the clock would expire the token)
        await conn.execute(
            text("UPDATE idempotency_keys SET expires_at = :t"), {"t": utcnow() - timedelta(seconds=1)}
        )
    r = await invoke(client, caller, tool, {"text": "different"}, key="old")
    assert r.status_code == 200
    assert upstream.count("/fast") == 2


async def test_output_with_nul_is_stored_and_replayed(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/nul"))
    caller = await make_caller(engine, "pro")
    first = await invoke(client, caller, tool, key="nul")
    assert first.status_code == 200, first.text
    assert first.json()["data"]["output"]["text"] == "a\x00b"
    second = await invoke(client, caller, tool, key="nul")
    assert second.content == first.content


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_bad_keys_are_422(client: httpx.AsyncClient, engine: AsyncEngine, key: str) -> None:
    tool = await make_tool(engine, "http://127.0.0.1:9/never")
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool, key=key)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_ERROR")

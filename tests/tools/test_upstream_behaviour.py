"""The upstream call against a real loopback server that misbehaves (API.md §5, "Upstream call")."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def _run(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, target: str, **tool: object
) -> httpx.Response:
    caller = await make_caller(engine, "pro")
    tool_id = await make_tool(engine, upstream.url(target), **tool)
    r = await invoke(client, caller, tool_id)
    await assert_settled(engine, caller)
    logs = await usage_logs(engine, caller.user_id)
    assert len(logs) == 1
    if r.status_code != 200:
        assert logs[0].tokens_used == 0
        assert logs[0].error_code == r.json()["error"]["code"]
    return r


async def test_5xx_is_retried_until_attempts_run_out(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/flap?key=down&fail=99&code=502"
    r = await _run(client, engine, upstream, target, max_attempts=3)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert r.json()["error"]["details"][0]["attempts"] == 3
    assert upstream.count(target) == 3


async def test_flapping_upstream_succeeds_on_retry(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/flap?key=flappy&fail=2&tokens=9"
    r = await _run(client, engine, upstream, target, max_attempts=3)
    assert r.status_code == 200
    assert r.json()["data"]["tokens_used"] == 9
    assert upstream.count(target) == 3


async def test_single_attempt_tool_is_not_retried(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/flap?key=once&fail=1"
    r = await _run(client, engine, upstream, target, max_attempts=1)
    assert r.status_code == 503
    assert upstream.count(target) == 1


async def test_429_retry_after_is_honoured(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/retry_after?key=ra&fail=1&after=1"
    started = time.monotonic()
    r = await _run(client, engine, upstream, target, max_attempts=2)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert upstream.count(target) == 2
    assert elapsed >= 0.9  # waited the upstream's Retry-After, not the 0-0.1 s jitter


async def test_timeout_gives_504_and_is_not_retried(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/hang", timeout_seconds=1, max_attempts=3)
    assert (r.status_code, r.json()["error"]["code"]) == (504, "TOOL_TIMEOUT")
    assert upstream.count("/hang") == 1


async def test_upstream_4xx_is_tool_input_invalid_with_its_message(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    target = "/status?code=400&msg=text%20too%20long"
    r = await _run(client, engine, upstream, target, max_attempts=3)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    detail = r.json()["error"]["details"][0]
    assert detail["message"] == "text too long"
    assert detail["upstream_status"] == 400
    assert upstream.count(target) == 1  # not retried


async def test_connection_reset_before_headers_is_retried(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/reset_headers", max_attempts=2)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert upstream.count("/reset_headers") == 2


async def test_connection_dropped_mid_body_is_502_not_retried(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/reset_body", max_attempts=3)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "TOOL_BAD_RESPONSE")
    assert upstream.count("/reset_body") == 1


@pytest.mark.parametrize("target", ["/nonjson", "/nan"])
async def test_2xx_that_is_not_json_is_502(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, target: str
) -> None:
    r = await _run(client, engine, upstream, target)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "TOOL_BAD_RESPONSE")
    assert upstream.count(target) == 1


@pytest.mark.parametrize("target", ["/big?mib=11", "/big?mib=11&chunked=1"])
async def test_response_over_10_mib_is_cut_off(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, target: str
) -> None:
    r = await _run(client, engine, upstream, target)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "TOOL_BAD_RESPONSE")
    assert "10 MiB" in r.json()["error"]["details"][0]["message"]


async def test_response_just_under_the_cap_is_accepted(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/big?mib=9.9&chunked=1")
    assert r.status_code == 200
    assert len(r.json()["data"]["output"]["data"]) > 9 * 1024 * 1024


async def test_redirect_is_not_followed(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/redirect")
    assert (r.status_code, r.json()["error"]["code"]) == (502, "TOOL_BAD_RESPONSE")
    assert upstream.count("/redirect") == 1
    assert upstream.count("/fast") == 0


async def test_headers_sent_upstream(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(
        engine, upstream.url("/echo_headers"), auth_header_name="X-Tool-Key", auth_header_value="s3cr3t-value"
    )
    r = await invoke(
        client,
        caller,
        tool,
        {"text": "hi"},
        headers={"X-Request-ID": "trace-123", "X-API-Key": "jfui_should_not_pass", "Cookie": "a=b"},
    )
    assert r.status_code == 200, r.text
    seen = r.json()["data"]["output"]["headers"]
    assert seen["x-tool-key"] == "s3cr3t-value"
    assert seen["x-request-id"] == "trace-123"
    assert seen["content-type"] == "application/json"
    assert seen["user-agent"].startswith("joyhub/")
    assert "authorization" not in seen
    assert "x-api-key" not in seen
    assert "cookie" not in seen
    assert upstream.last["/echo_headers"].method == "POST"
    assert upstream.last["/echo_headers"].body == b'{"text":"hi"}'
    assert "s3cr3t-value" not in r.text.replace(seen["x-tool-key"], "", 1)


async def test_cookies_from_one_call_never_ride_on_the_next(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    first, second = await make_caller(engine, "pro"), await make_caller(engine, "pro")
    setter = await make_tool(engine, upstream.url("/set_cookie"))
    echo = await make_tool(engine, upstream.url("/echo_headers"))
    assert (await invoke(client, first, setter)).status_code == 200
    r = await invoke(client, second, echo)
    assert r.status_code == 200, r.text
    assert "cookie" not in r.json()["data"]["output"]["headers"]


async def test_compressed_bomb_is_cut_off_by_decoded_size(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/gzip?mib=11")
    assert (r.status_code, r.json()["error"]["code"]) == (502, "TOOL_BAD_RESPONSE")
    assert "10 MiB" in r.json()["error"]["details"][0]["message"]


async def test_small_compressed_answer_is_decoded(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/gzip?mib=0.001")
    assert r.status_code == 200, r.text
    assert r.json()["data"]["output"]["data"].startswith("aaa")


async def test_an_answer_that_is_not_http_is_a_transport_failure(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    r = await _run(client, engine, upstream, "/garbage", max_attempts=2)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert upstream.count("/garbage") == 2


class _CountingHooks:
    def __init__(self) -> None:
        self.failures = 0

    async def failed(self) -> bool:
        self.failures += 1
        return False

    async def may_retry(self) -> bool:
        return True


async def test_backoff_schedule_and_retry_after_with_injected_sleep(upstream: Upstream) -> None:
    from joyhub.tools import upstream as gateway_upstream

    client = gateway_upstream.make_transport()
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    try:
        hooks = _CountingHooks()
        target = gateway_upstream.Target(upstream.url("/flap?key=bk&fail=3"), 5, 4)
        res = await gateway_upstream.call(
            client, target, b"{}", "rid", hooks, sleep=fake_sleep, rand=lambda: 1.0
        )
        assert (res.outcome, res.attempts, hooks.failures) == ("success", 4, 3)
        assert slept == pytest.approx([0.1, 0.2, 0.4])  # full jitter's upper bounds (rand = 1)

        slept.clear()
        target = gateway_upstream.Target(upstream.url("/retry_after?key=bk2&fail=2&after=3"), 5, 3)
        res = await gateway_upstream.call(client, target, b"{}", "rid", _CountingHooks(), sleep=fake_sleep)
        assert res.outcome == "success"
        assert slept == [3.0, 3.0]  # the upstream's Retry-After, not the jitter

        slept.clear()
        target = gateway_upstream.Target(upstream.url("/retry_after?key=bk3&fail=1&after=120"), 5, 2)
        await gateway_upstream.call(client, target, b"{}", "rid", _CountingHooks(), sleep=fake_sleep)
        assert slept == [gateway_upstream.RETRY_AFTER_CAP_SECONDS]  # capped
    finally:
        await client.aclose()

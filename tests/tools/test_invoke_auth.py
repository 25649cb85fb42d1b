"""Authentication of the invoke route, which its admission statement checks in the same round trip
(`MeteringConnection.admit`): the same answers as every other route, before any other check, and a
refused caller leaves nothing behind. Also the admission's tool-version rule (`tool_versions.py`).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.tools import admit
from tests.tools.helpers import (
    API,
    assert_settled,
    assert_untouched,
    invoke,
    make_caller,
    make_tool,
    run_sql,
    usage_logs,
)
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def _new_key(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[str, str]:
    r = await client.post(f"{API}/users/me/api-keys", json={"name": "script"}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"], r.json()["data"]["key"]


async def test_revoked_session_or_disabled_user_is_401_before_every_other_check(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    revoked = await make_caller(engine, "pro")
    await run_sql(
        engine, "UPDATE auth_sessions SET revoked_at = now() WHERE id = :id", id=revoked.account.session_id
    )
    disabled = await make_caller(engine, "pro")
    await run_sql(engine, "UPDATE users SET is_active = false WHERE id = :id", id=disabled.user_id)
    for caller in (revoked, disabled):
        # 401 even for a tool that does not exist (authentication comes first)
        for target in (tool, uuid.uuid4()):
            r = await invoke(client, caller, target, {"text": "x"})
            assert (r.status_code, r.json()["error"]["code"]) == (401, "INVALID_TOKEN")
            assert "X-Quota-Limit" not in r.headers
        await assert_untouched(engine, caller)
    assert upstream.total == 0


async def test_a_token_for_another_users_session_is_401(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    """The session must belong to the token's user: a forged pairing is refused."""
    from joyhub.core.security import create_access_token
    from tests.conftest import TEST_SECRET

    tool = await make_tool(engine, upstream.url("/fast"))
    one, other = await make_caller(engine, "pro"), await make_caller(engine, "pro")
    token = create_access_token(
        user_id=one.user_id,
        session_id=other.account.session_id,
        role="user",
        secret=TEST_SECRET,
        ttl=timedelta(minutes=5),
    )
    r = await client.post(
        f"{API}/tools/{tool}/invoke", json={"input": {}}, headers={"Authorization": f"Bearer {token}"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (401, "INVALID_TOKEN")
    await assert_untouched(engine, one)
    await assert_untouched(engine, other)


async def test_api_keys_invoke_and_are_touched_once_a_minute(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast?tokens=3"))
    caller = await make_caller(engine, "pro")
    key_id, key = await _new_key(client, caller.headers)
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        r = await client.post(f"{API}/tools/{tool}/invoke", json={"input": {"text": "x"}}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["tokens_used"] == 3
    async with engine.connect() as conn:
        first = (
            await conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": key_id})
        ).scalar_one()
    assert first is not None and abs((utcnow() - first).total_seconds()) < 60
    # an hour-old stamp is refreshed by the next call, even one that is then refused (404)
    await run_sql(
        engine, "UPDATE api_keys SET last_used_at = now() - interval '1 hour' WHERE id = :id", id=key_id
    )
    r = await client.post(
        f"{API}/tools/{uuid.uuid4()}/invoke", json={"input": {}}, headers={"X-API-Key": key}
    )
    assert r.status_code == 404
    async with engine.connect() as conn:
        touched = (
            await conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": key_id})
        ).scalar_one()
    assert abs((utcnow() - touched).total_seconds()) < 60
    await assert_settled(engine, caller)
    assert len(await usage_logs(engine, caller.user_id)) == 2


@pytest.mark.parametrize("how", ["revoked", "expired", "unknown", "malformed"])
async def test_unusable_api_keys_are_401_and_leave_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, how: str
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    key_id, key = await _new_key(client, caller.headers)
    if how == "revoked":
        assert (
            await client.delete(f"{API}/users/me/api-keys/{key_id}", headers=caller.headers)
        ).status_code == 204
    elif how == "expired":
        await run_sql(
            engine, "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = :id", id=key_id
        )
    elif how == "unknown":
        key = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    else:
        key = key + "x" * 300
    r = await client.post(f"{API}/tools/{tool}/invoke", json={"input": {}}, headers={"X-API-Key": key})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "INVALID_TOKEN")
    await assert_untouched(engine, caller)
    assert upstream.total == 0


async def test_a_tool_version_never_settled_answers_503_and_admits_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement admits only against the tool version the input was checked for; a tool
    edited on every try (simulated: this process never learns the version) is refused with a
    retryable 503 after a bounded number of tries — never admitted unchecked."""
    from joyhub.tools.tool_versions import ToolVersions

    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    seen: list[uuid.UUID] = []

    def forgetful(self: ToolVersions, tool_id: uuid.UUID, *args: Any) -> None:
        seen.append(tool_id)

    monkeypatch.setattr(ToolVersions, "learn", forgetful)
    r = await invoke(client, caller, tool, {"text": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "SERVICE_UNAVAILABLE")
    assert r.headers["Retry-After"] == "1"
    assert r.headers["X-Quota-Limit"] == "50000"
    assert seen == [tool] * (admit.MAX_ADMIT_TRIES - 1)  # bounded: the last try answers
    assert upstream.total == 0
    await assert_untouched(engine, caller)


SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 30000}},
    "required": ["text"],
}


@pytest.mark.parametrize(
    ("path_tool", "body", "extra_headers"),
    [
        (None, b"{}", {}),  # no input
        (None, b'{"input": {}, "unknown": 1}', {}),  # unknown field
        ("not-a-uuid", b'{"input": {}}', {}),  # malformed path
        (None, b'{"input": {}}', {"Idempotency-Key": "k" * 300}),  # header too long
        (None, b'{"input": {"a": NaN}}', {}),  # refused by the gateway's own encoding
        (None, b'{"input": {"a": "nul \\u0000 here"}}', {}),  # NUL: refused by the gateway
    ],
)
async def test_an_unusable_credential_is_401_before_any_validation_error(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    upstream: Upstream,
    path_tool: str | None,
    body: bytes,
    extra_headers: dict[str, str],
) -> None:
    """The route's dependency cannot know a session was revoked or a key is unknown; a request
    refused before the admission statement still confirms the credential first (API.md §5:
    authentication is the first check), and a good credential gets the validation error."""
    tool = path_tool or str(await make_tool(engine, upstream.url("/fast")))
    revoked = await make_caller(engine, "pro")
    await run_sql(
        engine, "UPDATE auth_sessions SET revoked_at = now() WHERE id = :id", id=revoked.account.session_id
    )
    good = await make_caller(engine, "pro")
    url = f"{API}/tools/{tool}/invoke"
    for headers in (revoked.headers, {"X-API-Key": "jfui_" + "A" * 40}):
        r = await client.post(
            url, content=body, headers={**headers, **extra_headers, "Content-Type": "application/json"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (401, "INVALID_TOKEN"), r.text
    r = await client.post(
        url, content=body, headers={**good.headers, **extra_headers, "Content-Type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_ERROR"), r.text
    for caller in (revoked, good):
        await assert_untouched(engine, caller)
    assert upstream.total == 0


async def test_big_inputs_are_validated_only_once_the_caller_is_known(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input over PRECHECK_MAX_BYTES is checked against the schema only after the statement
    has authenticated the caller: a forged key cannot make the hub validate a megabyte."""
    from joyhub.tools.tool_versions import ToolVersion

    tool = await make_tool(engine, upstream.url("/fast"), input_schema=SCHEMA)
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "warm"})).status_code == 200  # version known
    validated: list[int] = []
    real = ToolVersion.input_errors_async

    async def counting(self: ToolVersion, value: dict[str, Any], nbytes: int) -> list[dict[str, Any]]:
        validated.append(len(str(value)))
        return await real(self, value, nbytes)

    monkeypatch.setattr(ToolVersion, "input_errors_async", counting)
    big = "x" * (admit.PRECHECK_MAX_BYTES + 10)
    r = await client.post(
        f"{API}/tools/{tool}/invoke", json={"input": {"text": big}}, headers={"X-API-Key": "jfui_" + "B" * 40}
    )
    assert r.status_code == 401
    assert validated == []
    r = await invoke(client, caller, tool, {"text": big})  # valid: admitted after the caller is known
    assert r.status_code == 200, r.text
    r = await invoke(client, caller, tool, {"text": big + "y" * 30000})  # over maxLength
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    assert len(validated) == 2
    await assert_settled(engine, caller)


async def test_a_refused_caller_never_claims_the_half_open_trial(
    make_client: Any, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In half-open the one trial goes to a call that will be made: callers the statement then
    refuses (quota, credential) only ask whether a trial is due, without claiming it."""
    import asyncio

    c: httpx.AsyncClient = await make_client(circuit_failure_threshold=1, circuit_recovery_seconds=0.3)
    tool = await make_tool(engine, upstream.url("/status?code=500"), max_attempts=1)
    good = await make_caller(engine, "pro")
    assert (await invoke(c, good, tool, {"text": "x"})).status_code == 503  # opens the circuit
    await run_sql(
        engine, "UPDATE tools SET api_endpoint = :u WHERE id = :id", u=upstream.url("/fast"), id=tool
    )
    await asyncio.sleep(0.4)  # half-open
    breakers = c.app.state.gateway.breakers  # type: ignore[attr-defined]
    claims: list[bool] = []
    real = breakers.acquire

    async def spy(tool_id: str, lease_seconds: float, *, claim_trial: bool = True) -> Any:
        claims.append(claim_trial)
        return await real(tool_id, lease_seconds, claim_trial=claim_trial)

    monkeypatch.setattr(breakers, "acquire", spy)
    empty = await make_caller(engine, "pro", tokens_used=50_000)
    assert (await invoke(c, empty, tool, {"text": "x"})).status_code == 429
    assert claims and not any(claims)
    claims.clear()
    r = await invoke(c, good, tool, {"text": "x"})  # the trial: cleared first, then claimed
    assert r.status_code == 200, r.text
    assert claims == [False, True]
    assert (await breakers.view(str(tool))).state == "closed"
    await assert_untouched(engine, empty, 50_000)
    await assert_settled(engine, good)


async def test_an_api_key_row_locked_elsewhere_does_not_hold_up_the_admission(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    """The last-used stamp is best effort (SKIP LOCKED): the admission, which holds the
    subscription's row lock, never waits for the key's, so it cannot deadlock against a request
    that holds the key's lock and waits for the subscription's."""
    import asyncio

    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    key_id, key = await _new_key(client, caller.headers)
    await run_sql(
        engine, "UPDATE api_keys SET last_used_at = now() - interval '1 hour' WHERE id = :id", id=key_id
    )
    async with engine.connect() as holder:
        await holder.execute(text("SELECT 1 FROM api_keys WHERE id = :id FOR UPDATE"), {"id": key_id})
        r = await asyncio.wait_for(
            client.post(f"{API}/tools/{tool}/invoke", json={"input": {}}, headers={"X-API-Key": key}), 10
        )
        assert r.status_code == 200, r.text
        await holder.rollback()
    await assert_settled(engine, caller)


async def test_no_schema_work_is_done_for_a_caller_not_yet_authenticated(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forged API key cannot make the hub validate anything (issue 12, finding 3): an API key
    this process has not seen pass the credential rule has its input validated only after the
    admission statement found it good — then once, and the key is remembered."""
    from joyhub.tools.tool_versions import ToolVersion

    tool = await make_tool(engine, upstream.url("/fast"), input_schema=SCHEMA)
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "warm"})).status_code == 200  # version known
    validated: list[str] = []
    real = ToolVersion.input_errors_async

    async def counting(self: ToolVersion, value: dict[str, Any], nbytes: int) -> list[dict[str, Any]]:
        validated.append(str(value)[:20])
        return await real(self, value, nbytes)

    monkeypatch.setattr(ToolVersion, "input_errors_async", counting)
    forged = {"X-API-Key": "jfui_" + "F" * 40}
    for _ in range(3):
        r = await client.post(f"{API}/tools/{tool}/invoke", json={"input": {"text": "tiny"}}, headers=forged)
        assert (r.status_code, r.json()["error"]["code"]) == (401, "INVALID_TOKEN")
    assert validated == []  # never validated for a caller nobody vouched for

    _, key = await _new_key(client, caller.headers)
    r = await invoke(client, caller, tool, {"text": "by key"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert len(validated) == 1  # after the statement found the key good
    r = await invoke(client, caller, tool, {"text": 5}, headers={"Authorization": f"Bearer {key}"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    assert len(validated) == 2  # the key is known now: validated before the statement, once
    await assert_settled(engine, caller)

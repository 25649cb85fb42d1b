"""Requests leave no reference cycles behind on the server side.

Everything a request builds should be freed by reference counting when it ends. A cycle (for
instance a hook on `request.state` that closes over the request) is freed only by the cyclic GC,
which the workers run rarely (`cli._tune_gc`); under load, requests that wait seconds in the
admission line outlive the young-generation collections, and such a cycle showed as workers
growing by about 1 MiB/s at 1,000 connections. The test client (httpx over ASGI) makes cycles of
its own: only objects of other modules, and functions, cells, coroutines and frames, count.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.tools.helpers import API, invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration

_CLIENT_SIDE = ("httpx", "builtins")
_ALWAYS_OURS = ("function", "cell", "coroutine", "frame", "method")


async def _server_garbage(calls: Callable[[], Awaitable[None]], rounds: int = 5) -> list[str]:
    await calls()  # warm: caches filled, statements prepared
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(rounds):
            await calls()
        gc.collect()
        return sorted(
            {
                f"{type(o).__module__}.{type(o).__name__}"
                for o in gc.garbage
                if not type(o).__module__.startswith(_CLIENT_SIDE) or type(o).__name__ in _ALWAYS_OURS
            }
        )
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


async def test_invocations_leave_no_cycles(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    r = await client.post(f"{API}/users/me/api-keys", json={"name": "script"}, headers=caller.headers)
    key = r.json()["data"]["key"]

    async def calls() -> None:
        assert (await invoke(client, caller, tool, {"text": "x"})).status_code == 200
        r = await client.post(f"{API}/tools/{tool}/invoke", json={"input": {}}, headers={"X-API-Key": key})
        assert r.status_code == 200
        assert (await invoke(client, caller, tool, {"text": "x"}, key=str(uuid.uuid4()))).status_code == 200
        assert (await invoke(client, caller, uuid.uuid4(), {"text": "x"})).status_code == 404
        r = await client.post(f"{API}/tools/{tool}/invoke", json={"wrong": 1}, headers=caller.headers)
        assert r.status_code == 422

    found = await _server_garbage(calls)
    assert found == [], found


async def test_reads_and_refusals_leave_no_cycles(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    caller = await make_caller(engine, "pro")

    async def calls() -> None:
        for path in ("/users/me", "/tools", "/usage/summary", "/usage", "/subscriptions/current"):
            assert (await client.get(f"{API}{path}", headers=caller.headers)).status_code == 200
        assert (await client.get(f"{API}/users/me")).status_code == 401
        assert (await client.get(f"{API}/no-such-route", headers=caller.headers)).status_code == 404

    found = await _server_garbage(calls)
    assert found == [], found

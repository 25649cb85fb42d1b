"""Slow CSV downloads cannot take the pool (issue 12, item 4): keyset batches on short
transactions, at most 2 exports per user across processes, over a real HTTP server whose
readers stall."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import clock, utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.core.errors import RateLimited
from joyhub.core.leases import leases_for
from joyhub.usage import service
from joyhub.usage.dates import TimeRange
from tests.factories import Account, make_account
from tests.served_hub import served_in_process
from tests.usage.factories import make_tool

pytestmark = pytest.mark.integration

URL = "/api/v1/usage/export"
BASE = datetime(2025, 1, 1, tzinfo=UTC)
WAIT_SECONDS = 15.0


async def _bulk_logs(
    engine: AsyncEngine, user_id: uuid.UUID, tool_id: uuid.UUID, n: int, *, same_ts: bool = False
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO usage_logs (id, user_id, tool_id, plan_code, status, started_at, timestamp,"
                " tokens_used, tokens_reserved, duration_ms, request_id)"
                " SELECT gen_random_uuid(), :u, :t, 'pro', 'success', ts, ts, i, 0, 10,"
                " 'request-' || lpad(i::text, 12, '0')"
                " FROM generate_series(1, :n) AS i,"
                " LATERAL (SELECT CAST(:b AS timestamptz) + i * :step * interval '1 second' AS ts) AS x"
            ),
            {"u": user_id, "t": tool_id, "n": n, "b": BASE, "step": 0 if same_ts else 1},
        )


async def test_keyset_batches_return_every_row_once_in_order(engine: AsyncEngine) -> None:
    """Ties on the timestamp are broken by id, so batch edges neither skip nor repeat a row."""
    acc = await make_account(engine)
    tool = await make_tool(engine)
    await _bulk_logs(engine, acc.user_id, tool, 7, same_ts=True)
    await _bulk_logs(engine, acc.user_id, tool, 6)
    chunks = [
        chunk
        async for chunk in service.export_csv(
            make_sessionmaker(engine),
            acc.user_id,
            TimeRange(None, None),
            service.LogFilter(),
            batch=3,
        )
    ]
    rows = [line.split(",") for chunk in chunks[1:] for line in chunk.decode().strip().split("\r\n")]
    assert len(chunks) == 1 + 5  # the header, then batches of 3, 3, 3, 3, 1
    keys = [(row[1], row[0]) for row in rows]
    assert len(keys) == 13 and len(set(keys)) == 13
    assert keys == sorted(keys, reverse=True)


async def test_the_limit_holds_across_instances_and_a_dead_holders_lease_runs_out(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    acc = await make_account(engine)
    first, second = await make_client(), await make_client()
    now = utcnow()
    held = [
        await service.start_export(leases_for(first.app.state), acc.user_id, now),  # type: ignore[attr-defined]
        await service.start_export(leases_for(second.app.state), acc.user_id, now),  # type: ignore[attr-defined]
    ]
    with pytest.raises(RateLimited):
        await service.start_export(leases_for(second.app.state), acc.user_id, now)  # type: ignore[attr-defined]
    r = await first.get(URL, headers=acc.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (429, "RATE_LIMITED")
    assert int(r.headers["Retry-After"]) >= 1
    # another user is not concerned
    other = await make_account(engine)
    assert (await second.get(URL, headers=other.headers)).status_code == 200
    # a holder that keeps renewing keeps its slot; one that died loses it after the ttl
    leases = leases_for(first.app.state)  # type: ignore[attr-defined]
    clock.advance(timedelta(seconds=40))
    await leases.renew(held[0], utcnow())
    clock.advance(timedelta(seconds=30))
    await service.start_export(leases, acc.user_id, utcnow())  # held[1] ran out
    with pytest.raises(RateLimited):
        await service.start_export(leases, acc.user_id, utcnow())  # held[0] is alive


async def _stalled_export(port: int, account: Account) -> tuple[asyncio.StreamWriter, bytes]:
    """Start an export and read only its first bytes, then stop reading (the socket's receive
    buffer is tiny, so the server soon cannot send more)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET {URL} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {account.access_token}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_SECONDS)
    await asyncio.wait_for(reader.read(1024), WAIT_SECONDS)
    return writer, head


async def test_stalled_readers_hold_no_connection_and_others_are_served(
    make_client: Callable[..., Any], engine: AsyncEngine
) -> None:
    """Four exports whose clients stopped reading, on a pool of two connections: every other
    request is still served, and a user's third export is refused with 429."""
    c: httpx.AsyncClient = await make_client(
        own_engine=True, db_pool_size=2, db_max_overflow=0, db_pool_timeout=5
    )
    pool = c.app.state.engine.pool  # type: ignore[attr-defined]
    tool = await make_tool(engine)
    users = [await make_account(engine) for _ in range(2)]
    for user in users:
        await _bulk_logs(engine, user.user_id, tool, 10_000)  # ~1.5 MB of CSV each
    bystander = await make_account(engine)
    # 16 KiB kernel send buffers: a stalled export blocks after its first batch or two
    async with served_in_process(c.app, send_buffer=16 * 1024) as port:  # type: ignore[attr-defined]
        stalled = []
        try:
            for user in users:
                for _ in range(2):
                    writer, head = await _stalled_export(port, user)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    stalled.append(writer)
            # the four exports are blocked on their clients and hold no pooled connection
            async with asyncio.timeout(WAIT_SECONDS):
                while pool.checkedout():
                    await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_SECONDS) as other:
                third = await other.get(URL, headers=users[0].headers)
                assert (third.status_code, third.json()["error"]["code"]) == (429, "RATE_LIMITED")
                answers = await asyncio.gather(
                    *(other.get("/api/v1/users/me", headers=bystander.headers) for _ in range(6)),
                    *(other.get("/api/v1/usage", headers=users[1].headers) for _ in range(4)),
                    other.get("/ready"),
                )
                assert [a.status_code for a in answers] == [200] * 11, [
                    a.text for a in answers if a.status_code != 200
                ]
                small = await other.get(URL, headers=bystander.headers)  # the bystander's own export works
                assert small.status_code == 200
        finally:
            for writer in stalled:
                writer.close()
        # the stalled exports end with their connections: the user may export again
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_SECONDS) as again:
            async with asyncio.timeout(WAIT_SECONDS):
                while True:
                    r = await again.get(URL, headers=users[0].headers, params={"end_date": "2025-01-01"})
                    if r.status_code == 200:
                        break
                    assert r.status_code == 429
                    await asyncio.sleep(0.05)

"""An admission whose connection fails under it (API.md §5, guarantees 1-3).

Without an Idempotency-Key the admission statement takes a connection used within the last
second without the pre-ping (`db.connect_retried`). When that connection turns out dead — or any
connection fails under the statement — the gateway cannot know whether the statement committed,
so it undoes whatever it may have admitted (`MeteringStore.undo_admissions`) and admits again on a
pinged connection: the caller sees one success, one log, one charge.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core import metrics
from joyhub.tools.metering import AdmitRequest, AdmitResult, MeteringConnection
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, usage_logs
from tests.tools.test_ledger import _terminate_unseen
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def test_a_pooled_connection_killed_unseen_costs_the_call_nothing(
    make_client: Any, database_url: str, engine: AsyncEngine, upstream: Upstream
) -> None:
    c: httpx.AsyncClient = await make_client(own_engine=True, db_pool_size=1, db_max_overflow=0)
    tool = await make_tool(engine, upstream.url("/fast?tokens=3"))
    caller = await make_caller(engine, "pro")
    assert (await invoke(c, caller, tool, {"text": "x"})).status_code == 200
    app_engine: AsyncEngine = c.app.state.engine  # type: ignore[attr-defined]
    async with app_engine.connect() as conn:  # the pool's one connection, given back fresh
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    _terminate_unseen(database_url, pid)
    r = await invoke(c, caller, tool, {"text": "x"})
    assert r.status_code == 200, r.text
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", 3), ("success", 3)]
    await assert_settled(engine, caller)


async def test_an_admission_whose_reply_was_lost_is_undone_and_made_once(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement committed, then its connection failed before the reply: the pending log
    and the reservation it made are taken back, and the retry admits the call once."""
    tool = await make_tool(engine, upstream.url("/fast?tokens=4"))
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "warm"})).status_code == 200  # version known
    real = MeteringConnection.admit_many
    committed: list[AdmitResult] = []

    async def reply_lost(conn: MeteringConnection, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        results = await real(conn, reqs)
        if not committed:
            committed.extend(results)
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return results

    monkeypatch.setattr(MeteringConnection, "admit_many", reply_lost)
    recoveries = metrics.ADMISSION_RECOVERIES._value.get()
    r = await invoke(client, caller, tool, {"text": "x"})
    assert r.status_code == 200, r.text
    assert metrics.ADMISSION_RECOVERIES._value.get() == recoveries + 1  # counted for operators
    assert committed and committed[0].admission is not None  # the lost statement had admitted the call
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", 4), ("success", 4)]
    await assert_settled(engine, caller)


async def test_a_failure_that_persists_is_503_and_leaves_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = await make_tool(engine, upstream.url("/fast"))
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "warm"})).status_code == 200
    real = MeteringConnection.admit_many

    async def always_lost(conn: MeteringConnection, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        await real(conn, reqs)
        raise asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )

    monkeypatch.setattr(MeteringConnection, "admit_many", always_lost)
    r = await invoke(client, caller, tool, {"text": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "SERVICE_UNAVAILABLE")
    assert upstream.count("/fast") == 1  # only the warm-up call went upstream
    # both lost admissions were undone: only the warm-up call is on record
    logs = await usage_logs(engine, caller.user_id)
    assert [log.status for log in logs] == ["success"]
    await assert_settled(engine, caller)


async def test_a_lost_statement_that_commits_late_cannot_admit_the_call_twice(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our side of the connection failed while the statement was still on its way (a backend
    that outlives it, behind a pooler say). The retry reuses the statement's usage log id, so
    when the lost statement finally runs it fails on the log's primary key and rolls back whole:
    one log, one reservation, one charge."""
    from joyhub.tools.driver import DriverSession, driver_of

    tool = await make_tool(engine, upstream.url("/fast?tokens=5"))
    caller = await make_caller(engine, "pro")
    assert (await invoke(client, caller, tool, {"text": "warm"})).status_code == 200  # version known
    real = MeteringConnection.admit_many
    lost: list[AdmitRequest] = []

    async def not_yet(conn: MeteringConnection, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        if not lost:
            lost.extend(reqs)  # "sent", but it has not reached the server yet
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )
        return await real(conn, reqs)

    monkeypatch.setattr(MeteringConnection, "admit_many", not_yet)
    r = await invoke(client, caller, tool, {"text": "x"})
    assert r.status_code == 200, r.text
    assert r.json()["data"]["invocation_id"] == str(lost[0].log_id)  # the retry reused the log id

    async with engine.connect() as conn:  # now the lost statement runs, late
        with pytest.raises(asyncpg.exceptions.UniqueViolationError):
            await real(MeteringConnection(DriverSession(await driver_of(conn))), lost)
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", 5), ("success", 5)]
    await assert_settled(engine, caller)

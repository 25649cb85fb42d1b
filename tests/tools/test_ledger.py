"""The ledger's edges: rollover on invoke, period boundaries, double settle, transient retries."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.models import UsageLog
from joyhub.tools import metering
from joyhub.tools.metering import Admission, MeteringStore, Settlement, SettleRequest, ToolRead
from tests.tools.helpers import assert_settled, invoke, make_caller, make_tool, sub_state, usage_logs
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration


async def test_invoke_rolls_an_ended_period_forward_first(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    now = utcnow()
    caller = await make_caller(
        engine,
        "free",
        tokens_used=1000,  # the old period's quota is used up
        current_period_start=now - timedelta(days=31),
        current_period_end=now - timedelta(days=1),
    )
    tool = await make_tool(engine, upstream.url("/fast?tokens=3"))
    r = await invoke(client, caller, tool)
    assert r.status_code == 200, r.text
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used == 3  # new period: reset, then charged
    async with engine.connect() as conn:
        end = (
            await conn.execute(
                text("SELECT current_period_end FROM subscriptions WHERE user_id = :u"), {"u": caller.user_id}
            )
        ).scalar_one()
    assert end > now
    assert r.headers["X-Quota-Remaining"] == "997"


async def _pending(engine: AsyncEngine, caller: Any, tool: uuid.UUID, reserve: int = 4) -> Admission:
    log_id = uuid.uuid4()
    now = utcnow()  # the admission time: with the id, it names the log (its partition key)
    async with make_sessionmaker(engine)() as db, db.begin():
        await db.execute(
            text(
                "UPDATE subscriptions SET tokens_reserved = tokens_reserved + :r, inflight = inflight + 1"
                " WHERE id = :s"
            ),
            {"r": reserve, "s": caller.subscription_id},
        )
        db.add(
            UsageLog(
                id=log_id,
                user_id=caller.user_id,
                tool_id=tool,
                subscription_id=caller.subscription_id,
                plan_code="pro",
                status="pending",
                started_at=now,
                timestamp=now,
                tokens_used=0,
                tokens_reserved=reserve,
            )
        )
    read = ToolRead(tool, "http://unused", 5, 1, None, now, False, None, None, False)
    return Admission(log_id, caller.user_id, caller.subscription_id, "pro", read, None, now, 1000)


def _settle_kw(admission: Admission, caller: Any, tool: uuid.UUID, **over: Any) -> SettleRequest:
    kw: dict[str, Any] = {
        "admission": admission,
        "status": "success",
        "tokens": 9,
        "token_source": "reported",
        "duration_ms": 5,
        "error_code": None,
        "now": utcnow(),
        "response_status": 200,
        "response_body": b"{}",
    }
    kw.update(over)
    return SettleRequest(**kw)


async def test_settle_after_the_period_ended_keeps_the_log_in_the_charged_period(
    engine: AsyncEngine, upstream: Upstream
) -> None:
    now = utcnow()
    caller = await make_caller(
        engine, "pro", current_period_start=now - timedelta(days=30), current_period_end=now
    )
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    later = now + timedelta(seconds=5)  # the call ended after the period did; no rollover yet
    result = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool, now=later))
    assert result.settled and result.quota is not None and result.quota.used == 9
    logs = await usage_logs(engine, caller.user_id)
    assert logs[0].timestamp == now - timedelta(microseconds=1)  # inside [start, end)
    await assert_settled(engine, caller)


async def test_settling_twice_charges_once(engine: AsyncEngine, upstream: Upstream) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    first = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))
    second = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))
    assert first.settled and not second.settled
    assert (await sub_state(engine, caller.user_id)).tokens_used == 9
    await assert_settled(engine, caller)


async def test_settle_retries_transient_errors(
    engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    real = MeteringStore.settle_many
    calls = {"n": 0}

    async def flaky(*args: Any, **kw: Any) -> dict[uuid.UUID, Settlement]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("SELECT 1", {}, ConnectionResetError("connection reset"))
        return await real(*args, **kw)

    monkeypatch.setattr(MeteringStore, "settle_many", flaky)
    monkeypatch.setattr(metering, "SETTLE_RETRY_DELAYS", (0.0, 0.0))
    result = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))
    assert result.settled and calls["n"] == 2
    await assert_settled(engine, caller)

    async def broken(*args: Any, **kw: Any) -> dict[uuid.UUID, Settlement]:
        raise ValueError("a bug, not a blip")

    monkeypatch.setattr(MeteringStore, "settle_many", broken)
    with pytest.raises(ValueError):
        await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))


async def test_a_settle_whose_reply_was_lost_is_reported_as_charged(
    engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first attempt commits but its reply is lost (a transient error after the commit); the
    retry finds nothing pending. That is our own charge, not the sweep's doing: the settle says
    so and returns the quota as charged, once."""
    import logging

    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    real = MeteringStore.settle_many
    calls = {"n": 0}

    async def lost_reply(*args: Any, **kw: Any) -> dict[uuid.UUID, Settlement]:
        calls["n"] += 1
        result = await real(*args, **kw)
        if calls["n"] == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation")
        return result

    monkeypatch.setattr(MeteringStore, "settle_many", lost_reply)
    monkeypatch.setattr(metering, "SETTLE_RETRY_DELAYS", (0.0, 0.0))
    with caplog.at_level(logging.INFO, logger="joyhub.tools.metering"):
        result = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))
    assert result.settled and result.quota is not None
    assert (result.quota.used, result.quota.limit) == (9, 50_000)
    assert calls["n"] == 2
    assert "settled by an earlier attempt whose reply was lost" in caplog.text
    assert "closed by the sweep" not in caplog.text
    await assert_settled(engine, caller)


async def test_a_settle_after_the_sweep_says_so_and_charges_nothing(
    engine: AsyncEngine, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from tests.conftest import test_settings as hub_settings

    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    async with make_sessionmaker(engine)() as db, db.begin():
        closed = await MeteringStore.close_stale(db, hub_settings(), utcnow() + timedelta(hours=1))
    assert closed == 1
    with caplog.at_level(logging.INFO, logger="joyhub.tools.metering"):
        result = await MeteringStore(engine).settle(_settle_kw(admission, caller, tool))
    assert not result.settled
    assert "closed by the sweep; not charged" in caplog.text
    assert (await sub_state(engine, caller.user_id)).tokens_used == 0
    await assert_settled(engine, caller)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),
        (asyncpg.exceptions.SerializationError("could not serialize access"), True),
        (ConnectionResetError("connection reset"), True),
        (OperationalError("SELECT 1", {}, ConnectionResetError("connection reset")), True),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),
        (asyncpg.exceptions.DataError("invalid input"), False),
        (ValueError("a bug, not a blip"), False),
    ],
)
def test_which_settle_failures_are_retried(exc: BaseException, transient: bool) -> None:
    """The settle runs on the raw driver, so asyncpg's own exceptions must be recognised too."""
    assert metering.transient(exc) is transient


async def test_settle_on_a_connection_killed_since_its_last_use_still_settles_once(
    database_url: str, engine: AsyncEngine, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settle takes its connection without the pre-ping when the connection was used within
    the last second (`db.connect_retried`). One the server ended meanwhile, before this process
    could notice, fails the first attempt; the retry settles on a fresh connection: charged
    once, nothing left over. (Without the retry this test fails: the dead connection is used.)"""
    from joyhub.core.db import make_engine
    from tests.conftest import test_settings as hub_settings

    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    admission = await _pending(engine, caller, tool)
    monkeypatch.setattr(metering, "SETTLE_RETRY_DELAYS", (0.0, 0.0))
    own = make_engine(database_url, hub_settings(), pool_size=1, max_overflow=0)
    try:
        async with own.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        _terminate_unseen(database_url, pid)
        result = await MeteringStore(own).settle(_settle_kw(admission, caller, tool))
        assert result.settled
        again = await MeteringStore(own).settle(_settle_kw(admission, caller, tool))
        assert not again.settled  # settled once, whichever attempt did it
    finally:
        await own.dispose()
    logs = await usage_logs(engine, caller.user_id)
    assert [(log.status, log.tokens_used) for log in logs] == [("success", 9)]
    await assert_settled(engine, caller)


def _terminate_unseen(database_url: str, pid: int) -> None:
    """End backend `pid` and wait until it is gone, from another thread while this event loop is
    blocked: the loop cannot read the connection's FATAL message and EOF before its next use."""
    import threading

    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")

    async def kill() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        finally:
            await conn.close()

    done: list[BaseException | None] = []

    def run() -> None:
        try:
            asyncio.run(kill())
            done.append(None)
        except BaseException as exc:
            done.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert done == [None], done


async def test_the_sweep_gives_an_openai_tools_call_a_streams_time(
    engine: AsyncEngine, upstream: Upstream
) -> None:
    """An OpenAI-compatible tool streams whenever its caller asks (API.md §12): its calls get
    TOOL_STREAM_MAX_SECONDS before the sweep takes them for abandoned, like a streaming tool's."""
    from tests.conftest import test_settings as hub_settings

    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/v1"), protocol="openai", timeout_seconds=5, max_attempts=1)
    await _pending(engine, caller, tool)
    settings = hub_settings(stale_invocation_seconds=10, tool_stream_max_seconds=600)
    async with make_sessionmaker(engine)() as db, db.begin():  # past the tool's worst case, within a stream's
        assert await MeteringStore.close_stale(db, settings, utcnow() + timedelta(seconds=300)) == 0
    async with make_sessionmaker(engine)() as db, db.begin():  # past a stream's too
        assert await MeteringStore.close_stale(db, settings, utcnow() + timedelta(seconds=700)) == 1
    await assert_settled(engine, caller)

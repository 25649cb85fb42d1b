"""One account at full speed (issue 15): the calls of one subscription are admitted and settled
in batches (group commit, `tools/group_commit.py`), and the accounting is exactly that of calls
made one by one — across instances, at the quota's edge, and when a worker dies mid-batch."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.tools.metering import (
    ABANDONED,
    SETTLE_LINES,
    Admission,
    MeteringStore,
    SettleRequest,
)
from tests.conftest import test_settings as hub_settings
from tests.served_hub import ServedDatabase, hub_process, served_database, wait_ready
from tests.tools.helpers import (
    API,
    SubState,
    admit_request,
    assert_settled,
    daily_rollup,
    invoke,
    make_caller,
    make_tool,
    sub_state,
    tool_version,
    usage_logs,
)
from tests.tools.upstream_server import Upstream

pytestmark = pytest.mark.integration
__all__ = ["served_database"]  # the fixture, used by name


async def test_2000_calls_of_one_account_against_1000_tokens_on_two_instances_stay_exact(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    hubs = [await make_client(), await make_client()]
    caller = await make_caller(engine, "pro", tokens_used=49_000)  # 1,000 tokens left
    tool = await make_tool(engine, upstream.url("/fast?tokens=1"))
    results = await asyncio.gather(*(invoke(hubs[i % 2], caller, tool, {"n": i}) for i in range(2000)))
    codes = {r.status_code for r in results}
    assert codes <= {200, 429}, [r.text for r in results if r.status_code not in (200, 429)][:3]
    state = await sub_state(engine, caller.user_id)
    assert state.tokens_used <= 50_000  # 1-token calls, 2-token reservations: no overshoot at all
    logs = await usage_logs(engine, caller.user_id)
    assert sum(r.status_code == 200 for r in results) == len(logs) <= 1000
    assert all(r.json()["error"]["code"] == "QUOTA_EXCEEDED" for r in results if r.status_code == 429)
    await assert_settled(engine, caller, baseline=49_000)
    # the calls were written in batches: fewer statements than calls, on both instances
    for hub in hubs:
        gateway = hub.app.state.gateway
        assert gateway.admissions.items > gateway.admissions.batches
        assert gateway.store._settles.items > gateway.store._settles.batches


async def test_each_call_of_a_batch_gets_its_own_answer(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    """Calls of one account that share statements still get their own log, outcome, charge and
    quota headers: here half of them fail upstream, half succeed, with different counts."""
    hub = await make_client()
    caller = await make_caller(engine, "pro")
    ok = await make_tool(engine, upstream.url("/tokens_used?n=3"))
    bad = await make_tool(engine, upstream.url("/status?code=400&msg=nope"))
    results = await asyncio.gather(*(invoke(hub, caller, ok if i % 2 else bad, {"i": i}) for i in range(64)))
    for i, r in enumerate(results):
        if i % 2:
            assert r.status_code == 200 and r.json()["data"]["tokens_used"] == 3
        else:
            assert r.status_code == 422 and r.json()["error"]["code"] == "TOOL_INPUT_INVALID"
        assert int(r.headers["X-Quota-Remaining"]) >= 50_000 - 3 * 32
    ids = {r.json()["data"]["invocation_id"] for r in results if r.status_code == 200}
    assert len(ids) == 32
    logs = await usage_logs(engine, caller.user_id)
    assert (
        sorted((log.status, log.tokens_used) for log in logs) == [("error", 0)] * 32 + [("success", 3)] * 32
    )
    await assert_settled(engine, caller)


async def test_a_worker_killed_mid_batch_leaves_nothing_the_sweep_does_not_close(
    served_database: ServedDatabase, upstream: Upstream, tmp_path: Path
) -> None:
    db = served_database
    async with db.engine.begin() as conn:  # this database has the migration's limits: lift pro's
        await conn.execute(text("UPDATE plans SET requests_per_minute = NULL, max_concurrent = NULL"))
    caller = await make_caller(db.engine, "pro")
    tool = await make_tool(db.engine, upstream.url("/hang"), timeout_seconds=30, max_attempts=1)
    with hub_process(db.url, tmp_path, workers=1) as hub:
        await wait_ready(hub)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=hub.base_url, timeout=30, limits=limits) as client:
            calls = [
                asyncio.create_task(
                    client.post(
                        f"{API}/tools/{tool}/invoke", json={"input": {"i": i}}, headers=caller.headers
                    )
                )
                for i in range(48)
            ]
            async with asyncio.timeout(20):  # every call admitted and hanging on the upstream
                while upstream.count("/hang") < 48:
                    await asyncio.sleep(0.05)
            metrics = (await client.get("/metrics")).text
            os.killpg(hub.proc.pid, signal.SIGKILL)
            hub.proc.wait(10)
            await asyncio.gather(*calls, return_exceptions=True)
    admitted = re.search(r'joyhub_group_commit_batch_size_count\{kind="admit"\} (\d+)', metrics)
    assert admitted is not None and float(admitted.group(1)) < 48  # batches: fewer statements than calls

    state = await sub_state(db.engine, caller.user_id)
    assert (state.tokens_reserved > 0, state.inflight) == (True, 48)  # held by the dead worker
    async with make_sessionmaker(db.engine)() as session, session.begin():
        closed = await MeteringStore.close_stale(session, hub_settings(), utcnow() + timedelta(hours=1))
    assert closed == 48
    logs = await usage_logs(db.engine, caller.user_id)
    assert {(log.status, log.error_code, log.tokens_used) for log in logs} == {("error", ABANDONED, 0)}
    assert len(logs) == 48
    await assert_settled(db.engine, caller)  # nothing double-counted, nothing left reserved
    async with db.engine.connect() as conn:
        rollup = (
            await conn.execute(
                text("SELECT sum(invocations), sum(errors) FROM usage_daily WHERE user_id = :u"),
                {"u": caller.user_id},
            )
        ).one()
    assert tuple(rollup) == (48, 48)


async def test_settles_of_many_accounts_share_one_statement_and_each_account_is_charged_exactly(
    engine: AsyncEngine,
) -> None:
    """Settles arriving together are one statement whichever accounts they charge: each account
    still gets exactly its own charge, release, log, rollup and quota threshold event (here all
    24 accounts cross 80 % in the same two statements)."""
    tool = await make_tool(engine, "http://127.0.0.1:9/unused")
    callers = [await make_caller(engine, "pro", tokens_used=39_990) for _ in range(24)]  # 80 %: 40,000
    version = await tool_version(engine, tool)
    store = MeteringStore(engine)
    admissions = []
    for caller in callers:
        credential = Credential(user_id=caller.user_id, session_id=caller.account.session_id)
        admission = (await store.admit_batch([admit_request(tool, version, credential, reserve=20)]))[
            0
        ].admission
        assert admission is not None
        admissions.append(admission)

    def outcome(admission: Admission) -> SettleRequest:
        return SettleRequest(
            admission=admission, status="success", tokens=15, token_source="reported", duration_ms=1,
            error_code=None, now=utcnow(), response_status=200, response_body=b"{}",
        )  # fmt: skip

    # submitted in one loop turn: every settle joins a line before its writer runs
    settlements = await asyncio.gather(*(store.settle(outcome(a)) for a in admissions))
    assert store._settles.items == 24 and store._settles.batches <= SETTLE_LINES
    for caller, settlement in zip(callers, settlements, strict=True):
        assert settlement.settled and settlement.quota is not None
        assert settlement.quota.used == 40_005
        assert await sub_state(engine, caller.user_id) == SubState(40_005, 0, 0)
        assert [(log.status, log.tokens_used) for log in await usage_logs(engine, caller.user_id)] == [
            ("success", 15)
        ]
        assert await daily_rollup(engine, caller.user_id) == (1, 15)
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                text(
                    "SELECT data->>'subscription_id' AS sub, (data->>'threshold')::int AS threshold,"
                    " (data->>'tokens_used')::bigint AS used FROM webhook_events"
                    " WHERE type = 'quota.threshold_reached'"
                )
            )
        ).all()
    assert sorted((e.sub, e.threshold, e.used) for e in events) == sorted(
        (str(c.subscription_id), 80, 40_005) for c in callers
    )

"""Helpers of the gateway tests: tools and callers straight into the database, state readers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.auth.credentials import Credential
from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.core.security import token_digest
from joyhub.models import Tool
from joyhub.tools.driver import driver_of
from joyhub.tools.metering import Admission, AdmitRequest, SettleRequest
from tests.factories import Account, make_account, make_subscription
from tests.orgs.helpers import make_org
from tests.subscriptions.helpers import make_api_key

API = "/api/v1"


async def run_sql(engine: AsyncEngine, sql: str, **params: Any) -> None:
    """One statement in its own transaction (a test's direct change to the database)."""
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


async def make_tool(engine: AsyncEngine, endpoint: str, **fields: Any) -> uuid.UUID:
    """A live, active tool pointing at `endpoint` (fields override the defaults)."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": f"tool-{uuid.uuid4().hex[:8]}",
        "description": "a test tool",
        "api_endpoint": endpoint,
        "timeout_seconds": 5,
        "max_attempts": 3,
        "is_active": True,
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(Tool(**values))
    return uuid.UUID(str(values["id"]))


async def tool_version(engine: AsyncEngine, tool_id: uuid.UUID) -> datetime:
    """The tool's `updated_at`: the version a caller validated its input against."""
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT updated_at FROM tools WHERE id = :t"), {"t": tool_id})
        version: datetime = found.scalar_one()
    return version


def admit_request(
    tool_id: uuid.UUID,
    version: datetime,
    credential: Credential,
    *,
    reserve: int,
    request_id: str | None = None,
) -> AdmitRequest:
    """A call that passed every Python check, for `MeteringStore.admit_batch` directly."""
    return AdmitRequest(
        tool_id=tool_id, credential=credential, idempotency_key=None, now=utcnow(), reserve=reserve,
        request_id=request_id, tool_version=version, go=True, log_id=uuid.uuid4(),
    )  # fmt: skip


@dataclass
class Caller:
    account: Account
    subscription_id: uuid.UUID | None

    @property
    def headers(self) -> dict[str, str]:
        return self.account.headers

    @property
    def user_id(self) -> uuid.UUID:
        return self.account.user_id


async def make_caller(engine: AsyncEngine, plan: str | None = "pro", **sub_fields: Any) -> Caller:
    account = await make_account(engine)
    sub_id = await make_subscription(engine, account.user_id, plan, **sub_fields) if plan else None
    return Caller(account, sub_id)


async def invoke(
    client: httpx.AsyncClient,
    caller: Caller,
    tool_id: uuid.UUID | str,
    value: Any = None,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    hdrs = dict(caller.headers)
    if key is not None:
        hdrs["Idempotency-Key"] = key
    hdrs.update(headers or {})
    body = {"input": {"text": "hello"} if value is None else value}
    return await client.post(f"{API}/tools/{tool_id}/invoke", json=body, headers=hdrs)


@dataclass
class SubState:
    tokens_used: int
    tokens_reserved: int
    inflight: int


async def sub_state(engine: AsyncEngine, user_id: uuid.UUID) -> SubState:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT tokens_used, tokens_reserved, inflight FROM subscriptions WHERE user_id = :u"),
                {"u": user_id},
            )
        ).one()
    return SubState(row.tokens_used, row.tokens_reserved, row.inflight)


async def usage_logs(engine: AsyncEngine, user_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text(
                        "SELECT id, tool_id, status, tokens_used, tokens_reserved, error_code,"
                        " duration_ms, request_id, timestamp, started_at"
                        " FROM usage_logs WHERE user_id = :u ORDER BY started_at"
                    ),
                    {"u": user_id},
                )
            ).all()
        )


async def daily_rollup(engine: AsyncEngine, user_id: uuid.UUID) -> tuple[int, int]:
    """(invocations, tokens) of the user's daily rollups."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT COALESCE(SUM(invocations), 0) AS n, COALESCE(SUM(tokens), 0) AS tok"
                    " FROM usage_daily WHERE user_id = :u"
                ),
                {"u": user_id},
            )
        ).one()
    return int(row.n), int(row.tok)


async def assert_untouched(engine: AsyncEngine, caller: Caller, tokens_used: int = 0) -> None:
    """Nothing logged, charged or reserved for `caller`."""
    assert await usage_logs(engine, caller.user_id) == []
    if caller.subscription_id is not None:
        state = await sub_state(engine, caller.user_id)
        assert (state.tokens_used, state.tokens_reserved, state.inflight) == (tokens_used, 0, 0)


async def assert_settled(engine: AsyncEngine, caller: Caller, baseline: int = 0) -> None:
    """No reservation or call left in flight; tokens_used == baseline + sum of logs == rollups.

    `baseline` is what the factory put in `tokens_used` before any call.
    """
    state = await sub_state(engine, caller.user_id)
    logs = await usage_logs(engine, caller.user_id)
    assert state.tokens_reserved == 0
    assert state.inflight == 0
    assert all(log.status != "pending" for log in logs)
    assert state.tokens_used == baseline + sum(log.tokens_used for log in logs)
    invocations, tokens = await daily_rollup(engine, caller.user_id)
    assert invocations == len(logs)
    assert tokens == state.tokens_used - baseline


@dataclass
class MixedCallers:
    """Three callers of one tool, one of each kind the admission tells apart: a personal caller
    with an access token, a caller with an API key, an organization member billing the
    organization; and a call of each (`calls`, in that order)."""

    tool_id: uuid.UUID
    org_id: uuid.UUID
    users: list[uuid.UUID]  # the personal caller, the key's user, the member
    calls: dict[str, AdmitRequest]  # "personal", "api key", "organization"


async def mixed_callers(engine: AsyncEngine, **tool_fields: Any) -> MixedCallers:
    tool = await make_tool(engine, "http://127.0.0.1:9/unused", **tool_fields)
    version = await tool_version(engine, tool)
    plain = await make_caller(engine, "pro")
    keyed = await make_caller(engine, "pro")
    key = await make_api_key(engine, keyed.user_id)
    org = await make_org(engine, admins=1, members=1, token_limit=1000)
    member = org.of("member")
    personal = Credential(user_id=plain.user_id, session_id=plain.account.session_id)
    keyed_call = Credential(api_key_digest=token_digest(key))
    in_org = Credential(user_id=member.user_id, session_id=member.session_id, org_id=org.id)
    return MixedCallers(
        tool,
        org.id,
        [plain.user_id, keyed.user_id, member.user_id],
        {
            "personal": admit_request(tool, version, personal, reserve=10),
            "api key": admit_request(tool, version, keyed_call, reserve=10),
            "organization": admit_request(tool, version, in_org, reserve=10),
        },
    )


@asynccontextmanager
async def rolled_back(engine: AsyncEngine) -> AsyncIterator[Any]:
    """An asyncpg connection in a transaction rolled back whatever happens: nothing stays."""
    async with engine.connect() as conn:
        driver = await driver_of(conn)
        transaction = driver.transaction()
        await transaction.start()
        try:
            yield driver
        finally:
            await transaction.rollback()


def success_settle(admission: Admission) -> SettleRequest:
    """The call's outcome: a success of 5 tokens, for `MeteringStore.settle` directly."""
    return SettleRequest(
        admission=admission, status="success", tokens=5, token_source="reported", duration_ms=3,
        error_code=None, now=utcnow(), response_status=200, response_body=b"{}",
    )  # fmt: skip

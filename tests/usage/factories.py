"""Usage factories: settled invocations written the way the gateway's settle writes them.

`record_invocation` inserts the settled `usage_logs` row AND bumps the rollups in one transaction,
exactly what settle does, so the read models and the raw rows agree as they do in production.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.core.security import new_api_key, token_digest
from joyhub.models import ApiKey, Tool, UsageLog
from joyhub.usage.rollups import bump


async def make_tool(
    engine: AsyncEngine, name: str | None = None, *, deleted_at: datetime | None = None
) -> uuid.UUID:
    """A tools row inserted directly (no admin API involved)."""
    tool = Tool(
        id=uuid.uuid4(),
        name=name or f"tool-{uuid.uuid4().hex[:8]}",
        description="a test tool",
        api_endpoint="http://127.0.0.1:9/never-called",
        is_active=deleted_at is None,
        deleted_at=deleted_at,
    )
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(tool)
    return tool.id


async def record_invocation(
    engine: AsyncEngine,
    user_id: uuid.UUID,
    tool_id: uuid.UUID,
    *,
    status: str = "success",
    tokens: int = 0,
    ts: datetime | None = None,
    plan_code: str | None = "pro",
    request_id: str | None = None,
    error_code: str | None = None,
    duration_ms: int = 120,
    token_source: str = "estimated",
) -> uuid.UUID:
    """A settled invocation: the log row and its rollup bump, in the same transaction.

    `status` is success, error, timeout or cancelled (a stream the caller hung up on: no error
    code of its own unless given, charged `tokens` for what was relayed)."""
    ts = ts or utcnow()
    if status in ("error", "timeout") and error_code is None:
        error_code = "TOOL_TIMEOUT" if status == "timeout" else "TOOL_UNAVAILABLE"
    log = UsageLog(
        id=uuid.uuid4(),
        user_id=user_id,
        tool_id=tool_id,
        plan_code=plan_code,
        status=status,
        started_at=ts,
        timestamp=ts,
        tokens_used=tokens,
        tokens_reserved=0,
        token_source=token_source,
        duration_ms=duration_ms,
        request_id=request_id or uuid.uuid4().hex,
        error_code=error_code,
    )
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(log)
        await db.flush()
        await bump(
            db, user_id=user_id, tool_id=tool_id, plan_code=plan_code, ts=ts, status=status, tokens=tokens
        )
    return log.id


async def record_pending(
    engine: AsyncEngine, user_id: uuid.UUID, tool_id: uuid.UUID, *, ts: datetime | None = None
) -> uuid.UUID:
    """An admitted invocation not settled yet: never shown, never counted, no rollup."""
    ts = ts or utcnow()
    log = UsageLog(
        id=uuid.uuid4(),
        user_id=user_id,
        tool_id=tool_id,
        plan_code="pro",
        status="pending",
        started_at=ts,
        timestamp=ts,
        tokens_used=0,
        tokens_reserved=500,
        request_id=uuid.uuid4().hex,
    )
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(log)
    return log.id


async def make_api_key(
    engine: AsyncEngine,
    user_id: uuid.UUID,
    *,
    is_active: bool = True,
    expires_at: datetime | None = None,
    revoked_at: datetime | None = None,
) -> str:
    """An API key row inserted directly; returns the key (only its digest is stored)."""
    key = new_api_key()
    row = ApiKey(
        id=uuid.uuid4(),
        user_id=user_id,
        name="test key",
        key_prefix=key[:12],
        key_hash=token_digest(key),
        is_active=is_active,
        created_at=utcnow(),
        expires_at=expires_at,
        revoked_at=revoked_at,
    )
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(row)
    return key

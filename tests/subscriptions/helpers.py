"""Subscription-domain test helpers: direct DB reads and writes, so tests check real state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.core.security import JWT_ALGORITHM, new_api_key, token_digest
from joyhub.models import ApiKey, AuditLog, Plan, Subscription
from tests.conftest import TEST_SECRET
from tests.factories import Account

SUBS = "/api/v1/subscriptions"
ADMIN_PLANS = "/api/v1/admin/plans"


def grant_url(user_id: uuid.UUID | str) -> str:
    return f"/api/v1/admin/users/{user_id}/subscription"


def ts(value: str) -> datetime:
    """Parse an API timestamp (it must carry an explicit offset)."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


async def sub_row(engine: AsyncEngine, user_id: uuid.UUID) -> Subscription | None:
    async with make_sessionmaker(engine)() as db:
        return (
            await db.execute(select(Subscription).where(Subscription.user_id == user_id))
        ).scalar_one_or_none()


async def sub_count(engine: AsyncEngine, user_id: uuid.UUID) -> int:
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM subscriptions WHERE user_id = :u"), {"u": user_id}
                )
            ).scalar_one()
        )


async def set_sub(engine: AsyncEngine, user_id: uuid.UUID, **values: Any) -> None:
    async with make_sessionmaker(engine)() as db, db.begin():
        await db.execute(update(Subscription).where(Subscription.user_id == user_id).values(**values))


async def set_plan(engine: AsyncEngine, code: str, **values: Any) -> None:
    async with make_sessionmaker(engine)() as db, db.begin():
        await db.execute(update(Plan).where(Plan.code == code).values(**values))


async def plan_row(engine: AsyncEngine, code: str) -> Plan:
    async with make_sessionmaker(engine)() as db:
        plan = await db.get(Plan, code)
        assert plan is not None
        return plan


async def audit_rows(
    engine: AsyncEngine, *, action: str | None = None, target_type: str | None = None
) -> list[AuditLog]:
    stmt = select(AuditLog).order_by(AuditLog.created_at, AuditLog.id)
    if action is not None:
        stmt = stmt.where(AuditLog.action == action)
    if target_type is not None:
        stmt = stmt.where(AuditLog.target_type == target_type)
    async with make_sessionmaker(engine)() as db:
        return list((await db.execute(stmt)).scalars())


async def audit_actions(engine: AsyncEngine, target_type: str = "subscription") -> list[str]:
    return [row.action for row in await audit_rows(engine, target_type=target_type)]


async def make_api_key(engine: AsyncEngine, user_id: uuid.UUID) -> str:
    """An active API key row for the user (bypassing the identity endpoints)."""
    key = new_api_key()
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(
            ApiKey(
                id=uuid.uuid4(),
                user_id=user_id,
                name="test key",
                key_prefix=key[:12],
                key_hash=token_digest(key),
                is_active=True,
                created_at=utcnow(),
            )
        )
    return key


async def make_bulk_subscriptions(
    engine: AsyncEngine, count: int, *, plan: str = "free", ended_days_ago: float = 1
) -> list[uuid.UUID]:
    """`count` users, each with an active subscription whose period ended `ended_days_ago`."""
    now = utcnow()
    end = now - timedelta(days=ended_days_ago)
    users = [uuid.uuid4() for _ in range(count)]
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (id, name, email, password_hash, role, is_active, created_at, updated_at)"
                " VALUES (:id, 'Bulk', :email, 'x', 'user', true, :now, :now)"
            ),
            [{"id": u, "email": f"bulk-{u.hex}@example.com", "now": now} for u in users],
        )
        await conn.execute(
            text(
                "INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used, tokens_reserved,"
                " inflight, current_period_start, current_period_end, cancel_at_period_end,"
                " created_at, updated_at)"
                " VALUES (:id, :user_id, :plan, 'active', 7, 0, 0, :start, :end, false, :now, :now)"
            ),
            [
                {
                    "id": uuid.uuid4(),
                    "user_id": u,
                    "plan": plan,
                    "start": end - timedelta(days=30),
                    "end": end,
                    "now": now,
                }
                for u in users
            ],
        )
    return users


def auth(account: Account) -> dict[str, str]:
    """Bearer headers with an access token valid at the (test-shifted) clock's now.

    The token is built here rather than by `create_access_token`: PyJWT checks `iat` against
    the real wall clock, so a token minted after `clock.advance` would look "not yet valid".
    `iat` is therefore real time and `exp` is relative to the shifted clock, which is what the
    hub's own expiry check reads.
    """
    payload = {
        "sub": str(account.user_id),
        "sid": str(account.session_id),
        "role": account.role,
        "jti": uuid.uuid4().hex,
        "iat": int(datetime.now(UTC).timestamp()),
        "exp": int((utcnow() + timedelta(minutes=30)).timestamp()),
        "type": "access",
    }
    return {"Authorization": f"Bearer {jwt.encode(payload, TEST_SECRET, algorithm=JWT_ALGORITHM)}"}

"""Factories: plain async functions that put rows straight into the database.

They bypass the HTTP layer on purpose (fast, and usable before the endpoint under test is
trusted). `make_account` returns a user with a live session and an access token.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.core.security import create_access_token, hash_password_sync
from joyhub.models import AuthSession, Plan, Subscription, User
from tests.conftest import TEST_SECRET

DEFAULT_PASSWORD = "Correct-Horse-42!"


@dataclass
class Account:
    user_id: uuid.UUID
    email: str
    password: str
    session_id: uuid.UUID
    access_token: str
    role: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def make_account(
    engine: AsyncEngine,
    *,
    email: str | None = None,
    name: str = "Test User",
    password: str = DEFAULT_PASSWORD,
    role: str = "user",
    is_active: bool = True,
) -> Account:
    email = (email or f"user-{uuid.uuid4().hex[:10]}@example.com").lower()
    user = User(
        id=uuid.uuid4(),
        name=name,
        email=email,
        password_hash=hash_password_sync(password, 4),
        role=role,
        is_active=is_active,
    )
    sess = AuthSession(id=uuid.uuid4(), user_id=user.id)
    async with make_sessionmaker(engine)() as db, db.begin():
        db.add(user)
        await db.flush()
        db.add(sess)
    token = create_access_token(
        user_id=user.id, session_id=sess.id, role=role, secret=TEST_SECRET, ttl=timedelta(minutes=30)
    )
    return Account(user.id, email, password, sess.id, token, role)


async def make_admin(engine: AsyncEngine, **kw: Any) -> Account:
    return await make_account(engine, role="admin", **kw)


async def make_subscription(
    engine: AsyncEngine,
    user_id: uuid.UUID,
    plan: str = "free",
    *,
    tokens_used: int = 0,
    status: str = "active",
    period_days: int | None = None,
    **fields: Any,
) -> uuid.UUID:
    """An active subscription whose period started now (or as `fields` say)."""
    now = utcnow()
    async with make_sessionmaker(engine)() as db, db.begin():
        plan_row = await db.get(Plan, plan)
        assert plan_row is not None, plan
        days = period_days or plan_row.period_days
        sub = Subscription(
            id=uuid.uuid4(),
            user_id=user_id,
            plan_code=plan,
            status=status,
            tokens_used=tokens_used,
            current_period_start=fields.pop("current_period_start", now),
            current_period_end=fields.pop("current_period_end", now + timedelta(days=days)),
            **fields,
        )
        db.add(sub)
    return sub.id

"""core.db.after_commit: an action that follows only a change that stands."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.db import after_commit, make_sessionmaker

pytestmark = pytest.mark.integration


async def test_runs_once_on_commit(engine: AsyncEngine) -> None:
    calls: list[str] = []
    async with make_sessionmaker(engine)() as session:
        await session.execute(text("SELECT 1"))
        after_commit(session, lambda: calls.append("done"))
        assert calls == []
        await session.commit()
        assert calls == ["done"]
        await session.execute(text("SELECT 1"))
        await session.commit()  # a later transaction of the same session: not again
    assert calls == ["done"]


async def test_never_runs_when_the_transaction_rolls_back(engine: AsyncEngine) -> None:
    calls: list[str] = []
    async with make_sessionmaker(engine)() as session:
        await session.execute(text("SELECT 1"))
        after_commit(session, lambda: calls.append("done"))
        await session.rollback()
        await session.execute(text("SELECT 1"))
        await session.commit()  # the next transaction's commit is not the one it waited for
    assert calls == []

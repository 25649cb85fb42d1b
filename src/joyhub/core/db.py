"""The async engine, the session factory and the request-scoped session dependency.

One session per request and one commit point: `get_session` commits after the endpoint returns
and rolls back on any exception. It is declared with `scope="function"` so the commit happens
*before* the response is sent — a failing commit answers 500, never a false 200.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from joyhub.core.config import Settings


def make_engine(url: str, settings: Settings, **overrides: Any) -> AsyncEngine:
    """The engine with the seed's pool settings, pre-ping and asyncpg's statement cache."""
    kwargs: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_recycle": settings.db_pool_recycle,
        "pool_timeout": settings.db_pool_timeout,
        "pool_pre_ping": True,
        "connect_args": {
            "statement_cache_size": 512,
            "timeout": 5,
            "server_settings": {"application_name": "joyhub", "timezone": "UTC"},
        },
    }
    kwargs.update(overrides)
    return create_async_engine(url, **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Yield the request's session; commit when the endpoint succeeded, else roll back."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


DbSession = Annotated[AsyncSession, Depends(get_session, scope="function")]

"""Where analytics read (issue 18): the FastAPI dependencies that pick the read replica or the
primary per request, by the rules of `core/replica.py`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth.dependencies import CurrentUser
from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.db import DbSession
from joyhub.core.replica import ReadReplica


def replica_of(request: Request) -> ReadReplica | None:
    replica: ReadReplica | None = getattr(request.app.state, "replica", None)
    return replica


@dataclass(frozen=True)
class AnalyticsReads:
    """Where a request's analytics read: the session to use, and the session factory for work
    that opens its own sessions (the export's batches)."""

    session: AsyncSession
    factory: async_sessionmaker[AsyncSession]
    target: str  # "replica" or "primary"


async def _reads(
    request: Request, session: AsyncSession, user_id: uuid.UUID | None
) -> AsyncIterator[AnalyticsReads]:
    replica = replica_of(request)
    verdict = "not_configured" if replica is None else await replica.usable(session, user_id, utcnow())
    target = "replica" if verdict == "replica" else "primary"
    metrics.ANALYTICS_READS.labels(target=target, reason=verdict).inc()
    if replica is None or verdict != "replica":
        yield AnalyticsReads(session, request.app.state.sessionmaker, "primary")
        return
    async with replica.factory() as reads:
        yield AnalyticsReads(reads, replica.factory, "replica")


async def user_analytics(
    request: Request, session: DbSession, principal: CurrentUser
) -> AsyncIterator[AnalyticsReads]:
    """The caller's analytics: lag rule and read-your-writes rule."""
    async for reads in _reads(request, session, principal.id):
        yield reads


async def platform_analytics(request: Request, session: DbSession) -> AsyncIterator[AnalyticsReads]:
    """Platform-wide analytics (admin stats): the lag rule only."""
    async for reads in _reads(request, session, None):
        yield reads


UserAnalytics = Annotated[AnalyticsReads, Depends(user_analytics, scope="function")]
PlatformAnalytics = Annotated[AnalyticsReads, Depends(platform_analytics, scope="function")]

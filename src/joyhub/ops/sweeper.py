"""The periodic sweep: subscription rollover, stale invocations, expired throttle/idempotency rows.

`serve` runs it in the background every SWEEP_INTERVAL_SECONDS; `joyhub sweep` runs one pass.
Each job runs in its own short transaction and is safe to run concurrently on many workers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core.clock import utcnow
from joyhub.core.config import Settings

log = logging.getLogger("joyhub.sweep")

SweepJob = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]


def jobs() -> list[tuple[str, SweepJob]]:
    """The sweep's jobs, in order; each returns how many rows it touched."""
    return []


async def sweep_once(factory: async_sessionmaker[AsyncSession], settings: Settings) -> dict[str, int]:
    results: dict[str, int] = {}
    now = utcnow()
    for name, job in jobs():
        try:
            async with factory() as session, session.begin():
                results[name] = await job(session, settings, now)
        except Exception:
            log.exception("sweep job failed", extra={"job": name})
            results[name] = -1
    return results


async def sweep_once_cli(url: str, settings: Settings) -> int:
    from joyhub.core.db import make_engine, make_sessionmaker

    engine = make_engine(url, settings, pool_size=2, max_overflow=0)
    try:
        results = await sweep_once(make_sessionmaker(engine), settings)
    finally:
        await engine.dispose()
    log.info("sweep done", extra={"results": results})
    print(results)
    return 0 if all(v >= 0 for v in results.values()) else 1

"""The periodic sweep: subscription rollover, stale invocations, expired throttle/idempotency rows,
webhook retention.

`serve` runs it in the background every SWEEP_INTERVAL_SECONDS; `joyhub sweep` runs one pass.
Each job runs in its own short transaction and is safe to run concurrently on many workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core import metrics
from joyhub.core.clock import utcnow
from joyhub.core.config import Settings

log = logging.getLogger("joyhub.sweep")

SweepJob = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]


def jobs() -> list[tuple[str, SweepJob]]:
    """The sweep's jobs, in order; each returns how many rows it touched."""
    from joyhub.auth.sessions import sweep_expired
    from joyhub.core.audit_retention import purge_audit_logs
    from joyhub.subscriptions.rollover import sweep_due
    from joyhub.tools import sweeps as tools_sweeps
    from joyhub.usage import sweeps as usage_sweeps
    from joyhub.webhooks import sweeps as webhooks_sweeps

    return [
        ("subscription_rollover", sweep_due),
        ("identity_cleanup", sweep_expired),
        *tools_sweeps.jobs(),
        *usage_sweeps.jobs(),
        *webhooks_sweeps.jobs(),
        ("audit_retention", purge_audit_logs),
    ]


async def sweep_once(factory: async_sessionmaker[AsyncSession], settings: Settings) -> dict[str, int]:
    results: dict[str, int] = {}
    now = utcnow()
    for name, job in jobs():
        try:
            async with factory() as session, session.begin():
                results[name] = await job(session, settings, now)
            if results[name] > 0:
                metrics.CLEANUP_ROWS.labels(job=name).inc(results[name])
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


async def run_periodic(app: FastAPI) -> None:
    """`serve`'s background sweep: one pass every SWEEP_INTERVAL_SECONDS until cancelled.

    Every worker runs it; the jobs are safe to run concurrently. A failed pass is logged and the
    loop goes on — a database blip must not stop rollovers for the life of the process.
    """
    settings: Settings = app.state.settings
    while True:
        await asyncio.sleep(settings.sweep_interval_seconds)
        try:
            await sweep_once(app.state.sessionmaker, settings)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweep pass failed")


def start_periodic(app: FastAPI) -> asyncio.Task[None]:
    task = asyncio.create_task(run_periodic(app), name="joyhub-sweep")
    app.state.sweep_task = task
    return task


async def stop_periodic(task: asyncio.Task[None]) -> None:
    """Cancel the background sweep and wait for it, before the pool it uses is closed."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

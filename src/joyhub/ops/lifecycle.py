"""Start-up and shutdown of one hub process, in order, undone in reverse.

Resources live on `app.state`: `engine`, `sessionmaker`, `redis` (or None), `egress` (the
policy of outgoing calls, `core/egress.py`), `http` (the shared upstream client), `breakers`,
and the sweep task. Anything pre-seeded on `app.state` (the tests'
engine) is used as is and not closed here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from joyhub.core.config import Settings
from joyhub.core.db import make_engine, make_sessionmaker
from joyhub.core.embedded_pg import start_embedded, stop_embedded

log = logging.getLogger("joyhub.lifecycle")


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the embedded server under DATA_DIR (started here if needed)."""
    return settings.database_url or start_embedded(settings.data_dir)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        stack.callback(_forget_live_gauges)  # runs last, when nothing of ours is left to report
        if getattr(app.state, "engine", None) is None:
            url = await asyncio.to_thread(database_url, settings)
            if settings.database_url is None:
                stack.callback(stop_embedded)
            engine = make_engine(url, settings)
            stack.push_async_callback(engine.dispose)
            app.state.engine = engine
        if getattr(app.state, "sessionmaker", None) is None:
            app.state.sessionmaker = make_sessionmaker(app.state.engine)

        if getattr(app.state, "replica", None) is None:
            from joyhub.core.replica import ReadReplica

            app.state.replica = ReadReplica.from_settings(settings)
            if app.state.replica is not None:
                stack.push_async_callback(app.state.replica.engine.dispose)

        if getattr(app.state, "redis", None) is None:
            app.state.redis = None
            if settings.redis_url:
                import redis.asyncio as aioredis

                client = aioredis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
                stack.push_async_callback(client.aclose)
                app.state.redis = client

        if getattr(app.state, "egress", None) is None:
            from joyhub.core.egress import EgressPolicy

            app.state.egress = EgressPolicy.from_settings(settings)

        from joyhub.ops import startup

        await startup.run(app, stack)
        log.info("hub started")
        yield
        log.info("hub stopping")
        stopping = time.monotonic()
    # the stack has run: sweep stopped, invocations drained and settled, clients and pool closed
    log.info("hub stopped", extra={"shutdown_ms": round((time.monotonic() - stopping) * 1000)})


def _forget_live_gauges() -> None:
    """With several workers, drop this process's "live" gauge files (pool in use, pool size) so
    `/metrics` stops summing the samples of a worker that has exited; counters and histograms
    of the dead worker are kept, as prometheus-client's multiprocess mode intends."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

"""Per-domain start-up work, in one list so the order is visible.

Each step may push its own cleanup onto the exit stack (closed in reverse on shutdown).
Domains add one line each below.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from fastapi import FastAPI


async def run(app: FastAPI, stack: AsyncExitStack) -> None:
    """Domain start-up hooks, in order."""
    # identity: make sure ADMIN_EMAIL/ADMIN_PASSWORD's admin exists
    from joyhub.auth.bootstrap import ensure_admin_from_settings

    await ensure_admin_from_settings(app)
    # gateway: shared upstream HTTP client, circuit breakers, demo tools (--demo)
    from joyhub.tools import runtime as tools_runtime

    await tools_runtime.start(app, stack)
    # webhooks: the dispatcher (unless WEBHOOK_DISPATCH_IN_SERVE is off) and the circuit events
    from joyhub.webhooks import runtime as webhooks_runtime

    await webhooks_runtime.start(app, stack)
    # sweep: the periodic rollover/cleanup task
    from joyhub.ops import sweeper

    stack.push_async_callback(sweeper.stop_periodic, sweeper.start_periodic(app))
    return None

"""Per-domain start-up work, in one list so the order is visible.

Each step may push its own cleanup onto the exit stack (closed in reverse on shutdown).
Domains add one line each below.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

from fastapi import FastAPI


async def run(app: FastAPI, stack: AsyncExitStack) -> None:
    """Domain start-up hooks, in order."""
    # identity: make sure ADMIN_EMAIL/ADMIN_PASSWORD's admin exists
    from joyhub.auth.bootstrap import ensure_admin_from_settings

    await ensure_admin_from_settings(app)
    # gateway: metering store, shared upstream HTTP client, circuit breakers, admission line
    from joyhub.tools.runtime import build_gateway

    gateway = build_gateway(
        app.state.settings, app.state.engine, app.state.sessionmaker, app.state.redis, app.state.egress
    )
    stack.push_async_callback(gateway.upstream.aclose)
    stack.push_async_callback(gateway.drain)  # runs before the client closes (LIFO)
    app.state.gateway = gateway
    # demo tools (`joyhub serve --demo`): registered in the catalog, served by the hub itself
    if os.environ.get("JOYHUB_DEMO") == "1":
        from joyhub import demo

        await demo.setup(app)
    # webhooks: the dispatcher (unless WEBHOOK_DISPATCH_IN_SERVE is off) and the circuit events
    from joyhub.webhooks import runtime as webhooks_runtime

    await webhooks_runtime.start(app, stack)
    # sweep: the periodic rollover/cleanup task
    from joyhub.ops import sweeper

    stack.push_async_callback(sweeper.stop_periodic, sweeper.start_periodic(app))
    return None

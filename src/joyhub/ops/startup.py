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
    # gateway: shared upstream HTTP client, circuit breakers, demo tools (--demo)
    # sweep: the periodic rollover/cleanup task
    return None

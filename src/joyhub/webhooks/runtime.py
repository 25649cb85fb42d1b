"""The webhook machinery of one hub process: the dispatcher and the circuit-event listener.

`start` (a step of `ops/startup.py`) puts the `Dispatcher` on `app.state.webhooks`, runs it as a
background task when WEBHOOK_DISPATCH_IN_SERVE is on (the default: nothing else to start), and
makes the breakers tell `CircuitEvents` of their transitions. Shutdown undoes both, in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AsyncExitStack

from fastapi import FastAPI

from joyhub.core.config import Settings
from joyhub.webhooks.circuit_events import CircuitEvents
from joyhub.webhooks.dispatcher import Dispatcher

log = logging.getLogger("joyhub.webhooks")


async def start(app: FastAPI, stack: AsyncExitStack) -> None:
    settings: Settings = app.state.settings
    circuit_events = CircuitEvents(app.state.engine)
    app.state.gateway.breakers.observe(circuit_events)
    stack.push_async_callback(circuit_events.aclose)
    dispatcher = Dispatcher(app.state.engine, settings)
    app.state.webhooks = dispatcher
    if settings.webhook_dispatch_in_serve:
        task = asyncio.create_task(dispatcher.run(), name="joyhub-webhooks")
        stack.push_async_callback(_stop, task)


STOP_TIMEOUT_SECONDS = 20.0


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel the dispatcher; it finishes the attempts in flight (bounded) before it returns.
    Shutdown never waits longer than STOP_TIMEOUT_SECONDS for it."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_SECONDS)
    if not done:
        log.warning("webhook dispatcher did not stop in time")
        return
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_standalone(url: str, settings: Settings, *, once: bool) -> int:
    """`joyhub deliver`: the dispatcher on its own until SIGTERM/SIGINT (or, with `--once`, one
    pass over what is due now). For operators who keep delivery apart from serving: they set
    WEBHOOK_DISPATCH_IN_SERVE=false on the `serve` processes (both may also run together)."""
    import signal

    from joyhub.core.db import make_engine

    engine = make_engine(url, settings, pool_size=4, max_overflow=4)
    try:
        dispatcher = Dispatcher(engine, settings)
        if once:
            attempts = await dispatcher.deliver_due()
            log.info("delivered what was due", extra={"attempts": attempts})
            print({"attempts": attempts})
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(dispatcher.run(), name="joyhub-webhooks")
        log.info("webhook dispatcher started")
        await stop.wait()
        log.info("webhook dispatcher stopping")
        await _stop(task)
        return 0
    finally:
        await engine.dispose()

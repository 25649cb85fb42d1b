"""`tool.circuit_opened` / `tool.circuit_closed` (API.md §11, admin endpoints only).

The circuit state lives in Redis (or in the worker), not in the database, so these events cannot
share a transaction with their change: the breaker tells `CircuitEvents` of each transition
(`Breakers.observe`) and it writes the event in a short transaction of its own, off the
invocation's path (a task; the invocation that tripped the circuit does not wait for it). An
admin's manual reset writes its `tool.circuit_closed` in the reset request's own transaction
(`tools/service.reset_circuit`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.tools.breaker import CircuitChange
from joyhub.webhooks.events import TOOL_CIRCUIT_CLOSED, TOOL_CIRCUIT_OPENED

CLOSE_GRACE_SECONDS = 5.0

log = logging.getLogger("joyhub.webhooks")

_INSERT = text(
    """
    INSERT INTO webhook_events (id, type, user_id, data, created_at)
    SELECT :id, :type, NULL,
           jsonb_build_object('tool_id', t.id, 'tool_name', t.name,
                              'consecutive_failures', CAST(:failures AS integer)),
           :now
    FROM tools AS t WHERE t.id = :tool_id
    """
)


class CircuitEvents:
    """The breakers' listener: one event per transition, written by a tracked task."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, change: CircuitChange) -> None:
        try:
            tool_id = uuid.UUID(change.tool_id)
        except ValueError:
            return  # not a tool of the catalog
        task = asyncio.get_running_loop().create_task(self._write(tool_id, change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, tool_id: uuid.UUID, change: CircuitChange) -> None:
        event_type = TOOL_CIRCUIT_OPENED if change.change == "opened" else TOOL_CIRCUIT_CLOSED
        params = {
            "id": uuid.uuid4(),
            "type": event_type,
            "failures": change.consecutive_failures,
            "now": utcnow(),
            "tool_id": tool_id,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(_INSERT, params)
        except Exception as exc:
            log.warning(
                "could not write a circuit event",
                extra={"tool_id": str(tool_id), "error": type(exc).__name__},
            )

    async def aclose(self) -> None:
        """Let the events being written finish (bounded), at shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_SECONDS)

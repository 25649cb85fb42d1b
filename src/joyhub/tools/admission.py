"""The gateway's admission gate: a bulkhead between invocations and everything else.

An invocation's own work on the hub — authentication, the read-and-admit statement, its commit —
needs the same database pool and event loop as every read of the dashboard. Under overload (far
more clients than the pool has connections) invocations would otherwise take their share of
every queue, and a user's `GET /users/me` would wait behind hundreds of metered calls. The gate
lets at most GATEWAY_MAX_ADMISSIONS invocations per process be in that phase at once; the others
wait in line (first come, first served) *before* touching the database, so they cost nothing
while they wait, and reads go past them. A slot is given back as soon as the admission is
committed, before the upstream is called: a slow tool never holds a slot, so the gate bounds the
hub's own work, not the number of calls in flight.

A wait longer than GATEWAY_QUEUE_TIMEOUT_SECONDS answers 503 SERVICE_UNAVAILABLE with
Retry-After: the line stays bounded and nothing was admitted or charged.
"""

from __future__ import annotations

import asyncio

from joyhub.core import metrics
from joyhub.core.errors import ServiceUnavailable


class AdmissionSlot:
    """One place in the admission phase; `release` is idempotent."""

    def __init__(self, gate: AdmissionGate) -> None:
        self._gate: AdmissionGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate._release()

    def transfer(self) -> AdmissionSlot:
        """Hand the place to a new owner (the gateway's shielded task); this one no longer holds
        it, so its `release` is a no-op and only the new owner's gives the place back."""
        taken = AdmissionSlot.__new__(AdmissionSlot)
        taken._gate, self._gate = self._gate, None
        return taken


class AdmissionGate:
    def __init__(self, slots: int, timeout_seconds: float) -> None:
        self.slots = slots
        self.timeout_seconds = timeout_seconds
        self._free = asyncio.Semaphore(slots)  # FIFO: waiters are woken in arrival order
        self.in_use = 0

    async def enter(self) -> AdmissionSlot:
        """Wait for a slot (bounded); 503 SERVICE_UNAVAILABLE when the wait runs out."""
        if not self._free.locked():
            await self._free.acquire()  # a free slot: no timer, no waiting
            self.in_use += 1
            return AdmissionSlot(self)
        metrics.GATEWAY_WAITING.inc()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await self._free.acquire()
        except TimeoutError:
            raise ServiceUnavailable(
                "The gateway is at capacity; retry shortly", headers={"Retry-After": "1"}
            ) from None
        finally:
            metrics.GATEWAY_WAITING.dec()
        self.in_use += 1
        return AdmissionSlot(self)

    def _release(self) -> None:
        self.in_use -= 1
        self._free.release()

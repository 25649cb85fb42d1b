"""The admission gate (tools/admission.py): invocations queue for the hub's own work, reads do not."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.errors import ServiceUnavailable
from joyhub.tools.admission import AdmissionGate
from tests.tools.helpers import API, assert_settled, assert_untouched, invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream

# ------------------------------------------------------------------------------- the gate alone


async def test_slots_are_handed_out_first_come_first_served() -> None:
    gate = AdmissionGate(slots=1, timeout_seconds=5)
    first = await gate.enter()
    order: list[int] = []

    async def waiter(n: int) -> None:
        slot = await gate.enter()
        order.append(n)
        await asyncio.sleep(0)
        slot.release()

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(waiter(n)))
        await asyncio.sleep(0)  # each waiter joins the line before the next one
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert gate.in_use == 0


async def test_a_wait_that_runs_out_is_503_and_leaves_the_slot_alone() -> None:
    gate = AdmissionGate(slots=1, timeout_seconds=0.05)
    held = await gate.enter()
    with pytest.raises(ServiceUnavailable) as refused:
        await gate.enter()
    assert refused.value.headers == {"Retry-After": "1"}
    held.release()
    again = await gate.enter()  # the timed-out waiter took nothing with it
    assert gate.in_use == 1
    again.release()


async def test_release_is_idempotent_and_a_cancelled_waiter_takes_no_slot() -> None:
    gate = AdmissionGate(slots=1, timeout_seconds=5)
    held = await gate.enter()
    waiting = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    held.release()
    held.release()  # a second release must not free a slot that is not held
    assert gate.in_use == 0
    a = await gate.enter()
    with pytest.raises(ServiceUnavailable):
        gate.timeout_seconds = 0.05
        await gate.enter()  # still only one slot
    a.release()


async def test_a_transferred_slot_is_freed_only_by_its_new_owner() -> None:
    """The gateway's shielded task takes the request's slot over: the request's own release
    (its dependency ending, e.g. when the client hangs up) must not free a place whose
    admission is still running."""
    gate = AdmissionGate(slots=1, timeout_seconds=0.05)
    request_slot = await gate.enter()
    task_slot = request_slot.transfer()
    request_slot.release()
    assert gate.in_use == 1
    with pytest.raises(ServiceUnavailable):
        await gate.enter()  # still held, by the task
    task_slot.release()
    task_slot.release()
    assert gate.in_use == 0
    (await gate.enter()).release()


# --------------------------------------------------------------------------- through the API


@pytest.mark.integration
async def test_a_full_line_answers_503_without_a_trace_while_reads_go_past(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    c: httpx.AsyncClient = await make_client(gateway_max_admissions=1, gateway_queue_timeout_seconds=0.3)
    gate: AdmissionGate = c.app.state.gateway.gate  # type: ignore[attr-defined]
    caller = await make_caller(engine, "pro")
    tool = await make_tool(engine, upstream.url("/fast"))
    held = await gate.enter()  # the only slot: taken
    try:
        r = await invoke(c, caller, tool)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "SERVICE_UNAVAILABLE")
        assert r.headers["Retry-After"] == "1"
        me = await c.get(f"{API}/users/me", headers=caller.headers)
        assert me.status_code == 200  # reads never queue at the gate
    finally:
        held.release()
    await assert_untouched(engine, caller)
    assert upstream.total == 0
    r = await invoke(c, caller, tool)
    assert r.status_code == 200
    await assert_settled(engine, caller)


@pytest.mark.integration
async def test_the_slot_is_given_back_before_the_upstream_call(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    """A slow tool holds no slot: with one slot, a fast call overtakes a slow one in flight."""
    c: httpx.AsyncClient = await make_client(gateway_max_admissions=1, gateway_queue_timeout_seconds=5)
    caller = await make_caller(engine, "pro")
    # the slow tool answers after 3 s: ample margin for the fast call on a loaded machine
    slow = await make_tool(engine, upstream.url("/slow?delay=3.0"))
    fast = await make_tool(engine, upstream.url("/fast"))
    slow_call = asyncio.create_task(invoke(c, caller, slow))
    while upstream.total == 0:  # the slow call has reached its upstream
        await asyncio.sleep(0.01)
    r = await invoke(c, caller, fast)
    assert r.status_code == 200
    assert not slow_call.done()  # the fast call was admitted and answered during the slow one
    assert (await slow_call).status_code == 200
    await assert_settled(engine, caller)


@pytest.mark.integration
async def test_refused_invocations_give_their_slot_back(
    make_client: Any, engine: AsyncEngine, upstream: Upstream
) -> None:
    c: httpx.AsyncClient = await make_client(gateway_max_admissions=1, gateway_queue_timeout_seconds=0.5)
    gate: AdmissionGate = c.app.state.gateway.gate  # type: ignore[attr-defined]
    caller = await make_caller(engine, "pro")
    stranger = await make_caller(engine, None)
    tool = await make_tool(engine, upstream.url("/fast"))
    missing = "00000000-0000-4000-8000-000000000000"
    assert (await invoke(c, caller, missing)).status_code == 404
    assert (await invoke(c, stranger, tool)).status_code == 402
    bad = await c.post(f"{API}/tools/{tool}/invoke", json={"nope": 1}, headers=caller.headers)
    assert bad.status_code == 422
    anonymous = await c.post(f"{API}/tools/{tool}/invoke", json={"input": {}})
    assert anonymous.status_code == 401
    assert gate.in_use == 0
    assert (await invoke(c, caller, tool)).status_code == 200
    assert gate.in_use == 0

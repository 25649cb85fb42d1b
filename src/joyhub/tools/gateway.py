"""The invocation flow (API.md §5; DESIGN.md "The gateway core"): admit → call → settle.

`Gateway` is built once per process in the lifespan (`ops/startup.py`) from its parts — the
metering store (every ledger statement), the upstream client, the circuit breakers, the
admission line — and injected into the invoke route, which alone renders what `invoke` answers.
Steps 1 to 3 are `admit.py`'s, steps 4 and 5 `call.py`'s; `invoke` runs them for a request:

0. the route's first dependency takes a slot of the admission line (`admission.py`), which
   bounds how many invocations per worker are in steps 1 to 3 at once; step 3 gives it back.
   The route's credential dependency verifies an access token's signature and expiry (or an API
   key's form) without the database.
1. **checks only Python can make**, for the tool version this process knows
   (`tool_versions.py`): the input against the tool's input schema, then the circuit breaker
   (`breaker.acquire`). Their outcome is an input to step 2, not yet an answer. No schema work is
   done for a caller not yet vouched for — an API key this process has not seen pass the
   credential rule lately (`vouched.py`) — so a forged key cannot burn CPU. Some checks wait
   until a statement has found the caller authenticated and every SQL check passing (one more
   statement, rarely): the input of an unvouched caller, an input over PRECHECK_MAX_BYTES, and
   the half-open circuit's one trial, so a caller refused anyway cannot hold it.
2. **authenticate, read and admit** — one statement (`MeteringConnection.admit`), one round
   trip: it checks the credential by the one rule every route uses, reads the tool (from the
   database on every call, so an admin's edit applies to the very next call on every worker), the
   account the call bills and its plan, the tool's minimum plan and any live idempotency record,
   and — only when every check passes, including step 1's for this very tool version — atomically
   reserves the call's tokens and writes its `pending` usage log. Without an Idempotency-Key the
   statement commits on its own: a refusal writes nothing (but an API key's last-used stamp). A
   subscription whose period is over is rolled forward first, and a tool this process has not
   seen in its current version is learnt, and the statement re-run (at most `MAX_ADMIT_TRIES`).
3. **refusals**, in the contract's order, none of which touches the upstream or leaves a trace:
   credential (401) → tool live and active (404) → active subscription (402
   SUBSCRIPTION_REQUIRED) → plan rank (402 PLAN_UPGRADE_REQUIRED) → tokens left (429
   QUOTA_EXCEEDED) → input (422 TOOL_INPUT_INVALID) → circuit closed (503 TOOL_UNAVAILABLE +
   Retry-After). A repeated Idempotency-Key is answered before all but the first (replay or
   409): the first request already passed them. A request refused before the statement (a
   validation error) has its credential confirmed first, so 401 still comes first. With a key,
   the statement and the key's claim run in one transaction, committed before the call.
4. **call** the upstream with no transaction open and no connection held beyond a moment
   (`db.Releases` keeps a finished statement's connection ~2 ms for the next statement),
   reporting every attempt to the circuit breaker.
5. **settle** in one statement (`MeteringStore.settle`).

Steps 2 to 5 run in a task the request only *waits for* (`asyncio.shield`): a client that hangs
up cancels nothing — an admitted call completes, is charged or not, is logged exactly once, and
its answer is stored under its Idempotency-Key for the client's retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.auth.credentials import confirm
from joyhub.core.clock import utcnow
from joyhub.core.context import current_request_id, user_id_var
from joyhub.core.errors import ValidationFailed, field_error
from joyhub.subscriptions.rollover import apply_locked
from joyhub.tools import idempotency, protocols
from joyhub.tools.admission import AdmissionGate, AdmissionSlot
from joyhub.tools.admit import AdmissionRun, Admitted
from joyhub.tools.breaker import Breakers
from joyhub.tools.call import Call
from joyhub.tools.group_commit import GroupCommit
from joyhub.tools.metering import AdmitRequest, AdmitResult, MeteringStore
from joyhub.tools.outcomes import ENVELOPE, InvocationRequest, Outcome, Presenter, Stream
from joyhub.tools.tool_versions import ToolVersions
from joyhub.tools.upstream import Upstream
from joyhub.tools.vouched import RecentKeys

log = logging.getLogger("joyhub.tools")

T = TypeVar("T")
DRAIN_SECONDS = 30.0


def encode_input(value: dict[str, Any]) -> bytes:
    """The upstream request body (compact UTF-8 JSON); 422 for what JSON cannot carry safely."""
    try:
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return body.encode("utf-8")
    except ValueError:
        problem = "must not contain NaN or Infinity"
    except UnicodeEncodeError:
        problem = "must be valid Unicode (no lone surrogates)"
    except RecursionError:
        problem = "is nested too deeply"
    raise ValidationFailed(details=[field_error("body.input", problem)])


def _has_nul(node: Any) -> bool:
    if isinstance(node, str):
        return "\x00" in node
    if isinstance(node, dict):
        return any("\x00" in k or _has_nul(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_has_nul(v) for v in node)
    return False


class Gateway:
    """The invocation flow and the per-process parts it runs on."""

    def __init__(
        self,
        *,
        store: MeteringStore,
        upstream: Upstream,
        breakers: Breakers,
        gate: AdmissionGate,
        sessionmaker: async_sessionmaker[AsyncSession],
        stream_max_seconds: float = 600.0,
        stream_ping_seconds: float = 15.0,
    ) -> None:
        self.store = store
        self.stream_max_seconds = stream_max_seconds
        self.stream_ping_seconds = stream_ping_seconds
        self.upstream = upstream
        self.breakers = breakers
        self.gate = gate
        self.sessionmaker = sessionmaker
        self.tool_versions = ToolVersions()
        self.recent_keys = RecentKeys()
        # calls to one tool arriving together, whoever makes them, are admitted by one statement
        self.admissions: GroupCommit[tuple[Any, ...], AdmitRequest, AdmitResult] = GroupCommit(
            "admit", store.admit_batch
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    async def invoke(
        self,
        request: InvocationRequest,
        *,
        admission_slot: AdmissionSlot | None = None,
        presenter: Presenter = ENVELOPE,
    ) -> Outcome:
        """Run one invocation end to end: `Completed` or `Replay`, or an `AppError` raised (a
        refusal, or a failed call after its settle).

        `admission_slot` (the admission line's, `admission.py`) is given back once the admission
        is committed, before the upstream call. From the admission statement on, the work runs in
        a task the request only waits for: a client hanging up while its call is being admitted
        cannot leave an admitted call that is never made (the statement commits on its own)."""
        try:
            body = encode_input(request.input)
            if b"\\u0000" in body and _has_nul(request.input):
                raise ValidationFailed(details=[field_error("body.input", "must not contain NUL characters")])
        except ValidationFailed:
            await confirm(self.store.engine, request.credential)  # 401 comes first (API.md §5)
            raise
        key = request.idempotency_key
        run = AdmissionRun(
            gateway=self,
            request=request,
            body=body,
            digest=(
                idempotency.request_hash(request.tool_id, request.input, stream=request.stream)
                if key is not None
                else None
            ),
            now=utcnow(),
            # the task holds the slot from here: a request cancelled while its call is being
            # admitted must not free the slot while the admission still runs
            admission_slot=admission_slot.transfer() if admission_slot is not None else None,
        )
        task = self.track(self._admit_then_call(run, presenter))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # nobody will read a stream this task may still open: end it as soon as it is there
            task.add_done_callback(self._abandon_stream)
            raise
        finally:
            if run.user_id is not None:  # for the access log line
                user_id_var.set(str(run.user_id))

    def _abandon_stream(self, task: asyncio.Task[Outcome]) -> None:
        if not task.cancelled() and task.exception() is None and isinstance(task.result(), Stream):
            stream = task.result()
            assert isinstance(stream, Stream)
            self.track(stream.relay.abort(shutdown=False))

    async def _admit_then_call(self, run: AdmissionRun, presenter: Presenter) -> Outcome:
        admitted = await run.run()
        if not isinstance(admitted, Admitted):  # an idempotent replay
            return admitted
        tool = admitted.admission.tool
        body = run.body
        if tool.protocol == protocols.OPENAI:  # the tool's model id upstream, usage asked for
            body = encode_input(protocols.openai_body(tool, run.request.input, stream=run.request.stream))
        call = Call(
            gateway=self,
            admission=admitted.admission,
            permit=admitted.permit,
            body=body,
            presenter=presenter,
            request_id=current_request_id() or "-",
            operation=run.request.operation,
        )
        if run.request.stream:
            return await call.stream(keep_events=admitted.admission.idem_id is not None)
        return await call.run()

    async def admit_batched(self, req: AdmitRequest) -> AdmitResult:
        """Admit a call without an Idempotency-Key, group-committed with the calls to the same
        tool that arrive meanwhile, whoever makes them (`group_commit.py`)."""
        return await self.admissions.submit(req.batch_key, req)

    async def roll_over(self, subscription_id: uuid.UUID, now: datetime) -> None:
        """Roll a subscription whose period is over forward (rare: once a period), then re-run."""
        async with self.sessionmaker() as session:
            await apply_locked(session, subscription_id, now)
            await session.commit()

    # -- invocations in flight ----------------------------------------------------------------

    def track(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` as a task that outlives its request (strong reference until done)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, grace_seconds: float = DRAIN_SECONDS) -> None:
        """Wait (bounded) for invocations still running; the sweep closes any left behind. Then
        every connection they used is back in the pool, for the engine's disposal."""
        if self._tasks:
            log.info("waiting for invocations in flight", extra={"count": len(self._tasks)})
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
            if pending:
                log.warning("invocations still running at shutdown", extra={"count": len(pending)})
        await self.store.releases.wait()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the task's outcome as seen: a refusal raised after its client left is not news."""
    if not task.cancelled():
        task.exception()

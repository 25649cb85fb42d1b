"""The invocation flow (API.md §5; DESIGN.md "Flows"): admit → call → settle.

Steps 1 to 3 are `admit.py`'s, steps 4 and 5 `call.py`'s; this module runs them for a request.

0. the route's first dependency takes a slot of the admission line (`admission.py`), which
   bounds how many invocations per worker are in steps 1 to 3 at once; step 3 gives it back.
   The route's credential dependency verifies an access token's signature and expiry (or an API
   key's form) without the database.
1. **checks only Python can make**, for the tool version this process knows
   (`tool_versions.py`): the input against the tool's input schema, then the circuit breaker
   (`breaker.acquire`). Their outcome is an input to step 2, not yet an answer. Two of them wait
   until a statement has found the caller authenticated and every SQL check passing (one more
   statement, rarely): an input over PRECHECK_MAX_BYTES, so a forged credential cannot make the
   hub validate a megabyte, and the half-open circuit's one trial, so a caller refused anyway
   cannot hold it.
2. **authenticate, read and admit** — one statement (`ledger.READ_AND_ADMIT`), one round trip:
   it checks the credential's session or API key and the user (as every other route's principal
   dependency does), reads the tool (from the database on every call, so an admin's edit applies
   to the very next call on every worker), the subscription and plan limit, the tool's minimum
   plan and any live idempotency record, and — only when every check passes, including step 1's
   for this very tool version — atomically reserves the call's tokens and writes its `pending`
   usage log. Without an Idempotency-Key the statement commits on its own (no BEGIN/COMMIT round
   trips): a refusal writes nothing (but an API key's last-used stamp), so there is nothing to
   undo. A subscription whose period is
   over is rolled forward first (`ensure_current`), and a tool this process has not seen in its
   current version is learnt, and the statement re-run (at most `MAX_ADMIT_TRIES` times).
3. **refusals**, in the contract's order, none of which touches the upstream or leaves a trace:
   credential (401) → tool live and active (404) → active subscription (402
   SUBSCRIPTION_REQUIRED) → plan rank (402 PLAN_UPGRADE_REQUIRED) → tokens left (429
   QUOTA_EXCEEDED) → input (422 TOOL_INPUT_INVALID) → circuit closed (503 TOOL_UNAVAILABLE +
   Retry-After). A repeated Idempotency-Key is answered before all but the first (replay or
   409): the first request already passed them. A request refused before the statement (a
   validation error) has its credential confirmed first (`auth.dependencies.confirm_credential`),
   so 401 still comes first. With a key, the statement and the key's claim
   run in one transaction, committed before the call.
4. **call** the upstream (`upstream.call`) with no transaction open and the connection back in
   the pool, reporting every attempt to the circuit breaker.
5. **settle** (`ledger.settle`) in one statement.

Steps 2 to 5 run in a task the request only *waits for* (`asyncio.shield`): a client that hangs
up cancels nothing — an admitted call completes, is charged or not, is logged exactly once, and
its response is stored under its Idempotency-Key for the client's retry.

Quota headers (`X-Quota-Limit`, `X-Quota-Remaining`, `X-Quota-Reset`) go on every answer to a
caller with an active subscription; `X-Quota-Reset` is the period end as ISO 8601 UTC (`...Z`),
the same format as every other timestamp of the API.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from joyhub.auth.dependencies import Credential, confirm_credential
from joyhub.core.clock import utcnow
from joyhub.core.context import user_id_var
from joyhub.core.errors import ValidationFailed, field_error
from joyhub.tools import idempotency
from joyhub.tools.admission import AdmissionSlot
from joyhub.tools.admit import AdmissionRun
from joyhub.tools.call import call_for
from joyhub.tools.runtime import Runtime


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


async def invoke(
    app: FastAPI,
    *,
    credential: Credential,
    tool_id: uuid.UUID,
    value: dict[str, Any],
    idempotency_key: str | None,
    admission_slot: AdmissionSlot | None = None,
) -> Response:
    """Run one invocation end to end and return the HTTP response (success or failure).

    `admission_slot` (the admission gate's, `admission.py`) is given back once the admission
    is committed, before the upstream call. From the admission statement on, the work runs in a
    task the request only waits for: a client hanging up while its call is being admitted cannot
    leave an admitted call that is never made (the statement commits on its own)."""
    rt: Runtime = app.state.tools
    try:
        body = encode_input(value)
        if b"\\u0000" in body and _has_nul(value):
            raise ValidationFailed(details=[field_error("body.input", "must not contain NUL characters")])
    except ValidationFailed:
        await confirm_credential(app.state.engine, credential)  # 401 comes first (API.md §5)
        raise
    run = AdmissionRun(
        app=app,
        rt=rt,
        credential=credential,
        tool_id=tool_id,
        value=value,
        body=body,
        idempotency_key=idempotency_key,
        digest=idempotency.request_hash(tool_id, value) if idempotency_key is not None else None,
        now=utcnow(),
        # the task holds the slot from here: a request cancelled while its call is being admitted
        # must not free the slot while the admission still runs
        admission_slot=admission_slot.transfer() if admission_slot is not None else None,
    )
    try:
        return await asyncio.shield(rt.track(_admit_then_call(run)))
    finally:
        if run.user_id is not None:  # for the access log line
            user_id_var.set(str(run.user_id))


async def _admit_then_call(run: AdmissionRun) -> Response:
    admitted = await run.run()
    if isinstance(admitted, Response):  # an idempotent replay
        return admitted
    return await call_for(run, admitted).run()

"""The invocation flow (API.md §5; DESIGN.md "Flows"): admit → call → settle.

0. the route's first dependency takes a slot of the admission line (`admission.py`), which
   bounds how many invocations per worker are in steps 1 to 3 at once; step 3 gives it back.
1. **read and admit** — one statement (`ledger.READ_AND_ADMIT`) in the request's own transaction,
   right after authentication: it reads the tool (from the database on every call, so an admin's
   edit applies to the very next call on every worker), the subscription and plan limit, the
   tool's minimum plan and any live idempotency record, and — only when every check SQL can make
   passes — atomically reserves the call's tokens and writes its `pending` usage log. A
   subscription whose period is over is rolled forward first (`ensure_current`) and the
   statement re-run.
2. **checks**, in the contract's order, none of which touches the upstream or leaves a trace:
   tool live and active (404) → active subscription (402 SUBSCRIPTION_REQUIRED) → plan rank (402
   PLAN_UPGRADE_REQUIRED) → tokens left (429 QUOTA_EXCEEDED) → input against the tool's schema
   (422 TOOL_INPUT_INVALID) → circuit closed (503 TOOL_UNAVAILABLE + Retry-After). The first four
   are decided by the statement (nothing was admitted); a refusal at the last two rolls the
   admission back, so it leaves no log and no reservation. A repeated Idempotency-Key is answered
   before all of these (replay or 409) — the first request already passed them.
3. the idempotency claim (when a key is given), then **commit**: the admission is durable and the
   request's connection is back in the pool before the upstream is called.
4. **call** the upstream (`upstream.call`) with no transaction open, reporting every attempt to
   the circuit breaker.
5. **settle** (`ledger.settle`) in one transaction.

Steps 4 and 5 run in a task the request only *waits for* (`asyncio.shield`): a client that hangs
up mid-call cancels nothing — the call completes, is charged or not, is logged exactly once, and
its response is stored under its Idempotency-Key for the client's retry.

Quota headers (`X-Quota-Limit`, `X-Quota-Remaining`, `X-Quota-Reset`) go on every answer to a
caller with an active subscription; `X-Quota-Reset` is the period end as ISO 8601 UTC (`...Z`),
the same format as every other timestamp of the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import metrics
from joyhub.core.clock import iso_utc, utcnow
from joyhub.core.context import current_request_id
from joyhub.core.errors import (
    IdempotencyConflict,
    NotFound,
    PlanUpgradeRequired,
    QuotaExceeded,
    SubscriptionRequired,
    ToolInputInvalid,
    ToolUnavailable,
    ValidationFailed,
    field_error,
)
from joyhub.models import Subscription
from joyhub.subscriptions.rollover import ensure_current, is_due
from joyhub.tools import idempotency, ledger, token_count, upstream
from joyhub.tools.admission import AdmissionSlot
from joyhub.tools.breaker import Breakers, Permit
from joyhub.tools.driver import driver_of
from joyhub.tools.input_validation import input_errors, validators
from joyhub.tools.runtime import Runtime

log = logging.getLogger("joyhub.tools.gateway")

TRIAL_LEASE_SLACK_SECONDS = 5.0

_SCHEMA = "SELECT input_schema::text FROM tools WHERE id = $1"

# outcome -> (usage status, HTTP status, error code, message)
_FAILURES: dict[str, tuple[str, int, str, str]] = {
    "rejected": ("error", 422, "TOOL_INPUT_INVALID", "The tool rejected the input"),
    "bad_response": ("error", 502, "TOOL_BAD_RESPONSE", "The tool returned an invalid response"),
    "timeout": ("timeout", 504, "TOOL_TIMEOUT", "The tool did not answer in time"),
    "unavailable": ("error", 503, "TOOL_UNAVAILABLE", "The tool is unavailable"),
    "internal": ("error", 500, "INTERNAL_ERROR", "Internal server error"),
}


@dataclass(frozen=True)
class Quota:
    limit: int
    used: int
    period_end: datetime

    def headers(self) -> dict[str, str]:
        return {
            "X-Quota-Limit": str(self.limit),
            "X-Quota-Remaining": str(max(0, self.limit - self.used)),
            "X-Quota-Reset": iso_utc(self.period_end),
        }


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


def render(status: int, data: Any = None, error: dict[str, Any] | None = None) -> bytes:
    """The envelope as bytes, once: the same bytes are sent and stored for idempotent replay."""
    doc = {"data": data, "error": error, "meta": {"request_id": current_request_id() or "-"}}
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except UnicodeEncodeError:  # lone surrogates from the upstream: ASCII escapes are still JSON
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


async def _driver(session: AsyncSession) -> Any:
    """The asyncpg connection under the request's session, inside its open transaction.

    The hot-path statements go to the driver directly (one round trip, no ORM or statement
    compilation on top); they share the session's connection and transaction, so the session's
    commit or rollback covers them.
    """
    driver = await driver_of(await session.connection())
    if not driver.is_in_transaction():  # the session's transaction starts with its first statement
        await session.execute(text("SELECT 1"))
    return driver


def _is_due(row: Any, now: datetime) -> bool:
    """The rollover rule (`rollover.is_due`) applied to the subscription columns of the read."""
    if row["sub_id"] is None:
        return False
    # a plain stand-in for the ORM row: building a mapped instance costs more than the check
    probe = SimpleNamespace(
        status=row["sub_status"], current_period_end=row["current_period_end"], expires_at=row["expires_at"]
    )
    return is_due(cast(Subscription, probe), now)


async def _validator_errors(driver: Any, row: Any, value: dict[str, Any]) -> list[dict[str, Any]]:
    tool_id = uuid.UUID(str(row["tool_id"]))
    validator = validators.get(tool_id, row["tool_updated_at"])
    if validator is None:
        schema_text = await driver.fetchval(_SCHEMA, tool_id)
        schema = json.loads(schema_text) if schema_text is not None else None
        if not isinstance(schema, dict):  # JSON null is stored for "no schema" too
            return []
        validator = validators.put(tool_id, row["tool_updated_at"], schema)
    return input_errors(validator, value)


class _Hooks:
    """Reports each attempt to the breaker and remembers whether the last one failed."""

    def __init__(self, breakers: Breakers, tool_key: str, trial: bool) -> None:
        self.breakers = breakers
        self.tool_key = tool_key
        self.trial = trial
        self.failures = 0

    async def failed(self) -> bool:
        self.failures += 1
        opened = await self.breakers.record_failure(self.tool_key, trial=self.trial)
        if opened:
            metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["open"])
        return opened

    async def may_retry(self) -> bool:
        return (await self.breakers.view(self.tool_key)).state == "closed"


async def invoke(
    app: FastAPI,
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    tool_id: uuid.UUID,
    value: dict[str, Any],
    idempotency_key: str | None,
    admission_slot: AdmissionSlot | None = None,
) -> Response:
    """Run one invocation end to end and return the HTTP response (success or failure).

    `admission_slot` (the admission gate's, `admission.py`) is given back once the admission
    is committed, before the upstream call."""
    rt: Runtime = app.state.tools
    now = utcnow()
    body = encode_input(value)
    if b"\\u0000" in body and _has_nul(value):
        raise ValidationFailed(details=[field_error("body.input", "must not contain NUL characters")])
    digest = idempotency.request_hash(tool_id, value) if idempotency_key is not None else None

    driver = await _driver(session)

    async def read_and_admit() -> tuple[Any, uuid.UUID]:
        log_id = uuid.uuid4()
        found = await ledger.read_and_admit(
            driver,
            user_id=user_id,
            tool_id=tool_id,
            key=idempotency_key,
            now=now,
            reserve=token_count.reservation(len(body)),
            log_id=log_id,
            request_id=current_request_id(),
        )
        return found, log_id

    row, log_id = await read_and_admit()
    if _is_due(row, now):
        await ensure_current(session, user_id, now)
        row, log_id = await read_and_admit()
    active = row["sub_id"] is not None and row["sub_status"] == "active"
    quota = Quota(row["token_limit"], row["tokens_used"], row["current_period_end"]) if active else None
    headers = quota.headers() if quota else {}

    if not row["admitted"]:
        # nothing was written but a possible rollover: keep that, then say why
        await session.commit()
        if row["idem_state"] is not None and digest is not None:
            stored = idempotency.StoredKey(
                row["idem_state"], bytes(row["idem_hash"]), row["idem_status"], row["idem_body"]
            )
            return idempotency.replay(stored, digest, headers)
        if row["tool_id"] is None:
            raise NotFound("Tool not found", headers=headers)
        if not active:
            raise SubscriptionRequired()
        if row["min_rank"] is not None and row["plan_rank"] < row["min_rank"]:
            raise PlanUpgradeRequired(headers=headers)
        metrics.QUOTA_DENIALS.labels(row["plan_code"] or "").inc()
        raise _quota_exceeded(row["token_limit"], row["tokens_used"], row["current_period_end"], headers)

    tool_key = str(tool_id)
    permit: Permit | None = None
    committed = False
    try:
        errors = await _validator_errors(driver, row, value) if row["has_schema"] else []
        if errors:
            raise ToolInputInvalid(
                "The input does not match the tool's input schema", details=errors, headers=headers
            )
        permit = await rt.breakers.acquire(
            tool_key, lease_seconds=row["timeout_seconds"] + TRIAL_LEASE_SLACK_SECONDS
        )
        if permit.trial:
            metrics.CIRCUIT_STATE.labels(tool_key).set(metrics.CIRCUIT_STATE_VALUES["half_open"])
        if not permit.allowed:
            metrics.INVOCATIONS.labels(tool_key, "circuit_open").inc()
            raise ToolUnavailable(
                "The tool is temporarily unavailable (circuit open)",
                headers={**headers, "Retry-After": str(max(1, math.ceil(permit.retry_after)))},
            )
        idem_id = None
        if idempotency_key is not None and digest is not None:
            idem_id = await idempotency.claim(
                driver, user_id=user_id, key=idempotency_key, digest=digest, tool_id=tool_id, now=now
            )
            if idem_id is None:  # another request claimed it since our read
                raise _KeyTaken(
                    await idempotency.lookup(driver, user_id=user_id, key=idempotency_key, now=now)
                )
            await ledger.link_key(driver, idem_id, log_id)
        # the admission is durable, and the connection back in the pool, before the upstream call
        await session.commit()
        committed = True
        if admission_slot is not None:
            admission_slot.release()
    except _KeyTaken as taken:
        await session.rollback()  # our admission goes; the other request's stands
        if permit is not None:
            await rt.breakers.release(tool_key, permit)
        if taken.stored is None or digest is None:
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still in progress", headers=headers
            ) from None
        return idempotency.replay(taken.stored, digest, headers)
    except BaseException:
        if not committed:
            await session.rollback()  # undo the reservation and the pending log: no trace
        if permit is not None:
            await rt.breakers.release(tool_key, permit)
        raise
    admission = ledger.Admission(log_id, row["admitted_plan"], idem_id)

    target = upstream.Target(
        url=row["api_endpoint"],
        timeout_seconds=row["timeout_seconds"],
        max_attempts=1 if permit.trial else row["max_attempts"],
        label=tool_key,
        secret_header=(row["auth_header_name"], row["auth_header_value"])
        if row["auth_header_name"] and row["auth_header_value"]
        else None,
    )
    call = _Call(
        app=app,
        rt=rt,
        admission=admission,
        permit=permit,
        target=target,
        body=body,
        user_id=user_id,
        tool_id=tool_id,
        tool_key=tool_key,
        quota=quota,
        request_id=current_request_id() or "-",
    )
    task = rt.track(call.run())
    return await asyncio.shield(task)


class _KeyTaken(Exception):
    """The idempotency claim lost to a request that claimed the key after our read."""

    def __init__(self, stored: idempotency.StoredKey | None) -> None:
        super().__init__("idempotency key taken")
        self.stored = stored


def _quota_exceeded(limit: int, used: int, period_end: datetime, headers: dict[str, str]) -> QuotaExceeded:
    return QuotaExceeded(
        details=[
            {
                "field": None,
                "message": "No tokens left in this billing period",
                "token_limit": limit,
                "tokens_used": used,
                "period_end": iso_utc(period_end),
            }
        ],
        headers=headers,
    )


@dataclass
class _Call:
    """Steps 4 and 5 for one admitted invocation; run shielded from the request's cancellation."""

    app: FastAPI
    rt: Runtime
    admission: ledger.Admission
    permit: Permit
    target: upstream.Target
    body: bytes
    user_id: uuid.UUID
    tool_id: uuid.UUID
    tool_key: str
    quota: Quota | None
    request_id: str

    async def run(self) -> Response:
        started = time.perf_counter()
        hooks = _Hooks(self.rt.breakers, self.tool_key, self.permit.trial)
        internal = False
        try:
            result = await upstream.call(self.rt.http, self.target, self.body, self.request_id, hooks)
        except Exception:
            # a bug of ours, not the upstream's: settle as an error all the same (0 tokens)
            log.exception("upstream call failed unexpectedly", extra={"tool_id": self.tool_key})
            result = upstream.UpstreamResult("unavailable", attempts=hooks.failures)
            internal = True
        duration_ms = int((time.perf_counter() - started) * 1000)
        try:
            if internal:
                await self.rt.breakers.release(self.tool_key, self.permit)
            elif hooks.failures < result.attempts:
                # the last attempt reached a live upstream: success, 4xx or a garbled 2xx
                await self.rt.breakers.record_success(
                    self.tool_key, trial=self.permit.trial, clean=self.permit.clean
                )
                if not self.permit.clean:
                    metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["closed"])
        finally:
            outcome = "internal" if internal else result.outcome
            metrics.INVOCATIONS.labels(self.tool_key, outcome).inc()
            response = await self._settle(result, duration_ms, outcome)
        return response

    async def _settle(self, result: upstream.UpstreamResult, duration_ms: int, outcome: str) -> Response:
        invocation_id = str(self.admission.log_id)
        retry_after: str | None = None
        if outcome == "success":
            tokens = token_count.tokens_for(result.output, len(self.body), result.output_bytes)
            status, http_status, error_code = "success", 200, None
            payload = render(
                200,
                data={
                    "invocation_id": invocation_id,
                    "tool_id": str(self.tool_id),
                    "status": "success",
                    "output": result.output,
                    "tokens_used": tokens,
                    "duration_ms": duration_ms,
                },
            )
        else:
            status, http_status, error_code, message = _FAILURES[outcome]
            tokens = 0
            detail: dict[str, Any] = {
                "field": "body.input" if outcome == "rejected" else None,
                "message": result.message or message,
                "invocation_id": invocation_id,
                "attempts": result.attempts,
            }
            if result.upstream_status is not None:
                detail["upstream_status"] = result.upstream_status
            payload = render(http_status, error={"code": error_code, "message": message, "details": [detail]})
            if result.circuit_open:
                view = await self.rt.breakers.view(self.tool_key)
                if view.opened_until is not None:
                    left = view.opened_until.timestamp() - self.rt.breakers.clock()
                    retry_after = str(max(1, math.ceil(left)))
            self._log_failure(result, duration_ms)
        settlement = await ledger.settle(
            self.app.state.engine,
            admission=self.admission,
            user_id=self.user_id,
            status=status,
            tokens=tokens,
            duration_ms=duration_ms,
            error_code=error_code,
            now=utcnow(),
            response_status=http_status,
            response_body=payload,
        )
        headers: dict[str, str] = {}
        if settlement.tokens_used is not None and settlement.token_limit is not None:
            assert settlement.period_end is not None
            headers = Quota(settlement.token_limit, settlement.tokens_used, settlement.period_end).headers()
        elif self.quota is not None:
            headers = self.quota.headers()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return Response(
            content=payload, status_code=http_status, media_type="application/json", headers=headers
        )

    def _log_failure(self, result: upstream.UpstreamResult, duration_ms: int) -> None:
        level = logging.INFO if result.outcome == "rejected" else logging.WARNING
        log.log(
            level,
            "tool invocation failed",
            extra={
                "tool_id": self.tool_key,
                "invocation_id": str(self.admission.log_id),
                "outcome": result.outcome,
                "attempts": result.attempts,
                "upstream_status": result.upstream_status,
                "duration_ms": duration_ms,
            },
        )

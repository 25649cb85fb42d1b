"""The invocation flow (API.md §5; DESIGN.md "Flows"): admit → call → settle.

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
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, NoReturn, cast

from fastapi import FastAPI
from fastapi.responses import Response

from joyhub.auth.dependencies import Credential, confirm_credential
from joyhub.core import metrics
from joyhub.core.clock import iso_utc, utcnow
from joyhub.core.context import current_request_id, user_id_var
from joyhub.core.errors import (
    AppError,
    IdempotencyConflict,
    InvalidToken,
    NotFound,
    PlanUpgradeRequired,
    QuotaExceeded,
    ServiceUnavailable,
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
from joyhub.tools.runtime import Runtime
from joyhub.tools.tool_versions import ToolVersion

log = logging.getLogger("joyhub.tools.gateway")

TRIAL_LEASE_SLACK_SECONDS = 5.0

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


def _is_due(row: Any, now: datetime) -> bool:
    """The rollover rule (`rollover.is_due`) applied to the subscription columns of the read."""
    if row["sub_id"] is None:
        return False
    # a plain stand-in for the ORM row: building a mapped instance costs more than the check
    probe = SimpleNamespace(
        status=row["sub_status"], current_period_end=row["current_period_end"], expires_at=row["expires_at"]
    )
    return is_due(cast(Subscription, probe), now)


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
    attempt = _Invocation(
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
        return await asyncio.shield(rt.track(attempt.run()))
    finally:
        if attempt.user_id is not None:  # for the access log line
            user_id_var.set(str(attempt.user_id))


# Tries of the admission statement in one request: a tool version to learn, a check deferred
# until the caller is known (`_Invocation.cleared`), the answer — and one more for an edit racing.
MAX_ADMIT_TRIES = 4
# Inputs up to this size are checked against the schema before the statement; a bigger one only
# once the statement has found its caller authenticated and every other check passing, so an
# unauthenticated request cannot make the hub validate a megabyte.
PRECHECK_MAX_BYTES = 16 * 1024


@dataclass
class _Admitted:
    row: Any
    log_id: uuid.UUID
    permit: Permit


class _KeyTaken(Exception):
    """The idempotency claim lost to a request that claimed the key after our read."""

    def __init__(self, stored: idempotency.StoredKey | None) -> None:
        super().__init__("idempotency key taken")
        self.stored = stored


class _RollOver(Exception):
    """The caller's subscription period is over: roll it forward, then admit again."""

    def __init__(self, user_id: uuid.UUID) -> None:
        super().__init__("subscription period over")
        self.user_id = user_id


@dataclass
class _Invocation:
    """Steps 1 to 3 for one request, then the call (`_Call`)."""

    app: FastAPI
    rt: Runtime
    credential: Credential
    tool_id: uuid.UUID
    value: dict[str, Any]
    body: bytes
    idempotency_key: str | None
    digest: bytes | None
    now: datetime
    admission_slot: AdmissionSlot | None
    user_id: uuid.UUID | None = None
    # a statement found the caller authenticated and every check SQL makes passing: a big input
    # may now be validated, and a due trial call claimed
    cleared: bool = False

    @property
    def tool_key(self) -> str:
        return str(self.tool_id)

    async def run(self) -> Response:
        rolled = False
        try:
            while True:
                try:
                    async with self.app.state.engine.connect() as conn:
                        driver = await driver_of(conn)
                        if self.idempotency_key is None:
                            # one statement, committed on its own: a refusal writes nothing but
                            # an API key's last-used stamp
                            admitted = await self._admit(driver, may_roll_over=not rolled)
                        else:
                            admitted = await self._admit_with_key(driver, may_roll_over=not rolled)
                    break
                except _RollOver as due:  # with the connection given back first
                    await self._roll_over(due.user_id)
                    rolled = True
        finally:
            # the admission is durable (or refused), and the connection back in the pool: the
            # slot goes back before the upstream call
            if self.admission_slot is not None:
                self.admission_slot.release()
        if isinstance(admitted, Response):
            return admitted
        return await self._call(admitted)

    async def _admit_with_key(self, driver: Any, *, may_roll_over: bool) -> _Admitted | Response:
        """The admission and the key's claim in one transaction: both or neither."""
        assert self.idempotency_key is not None and self.digest is not None
        admitted: _Admitted | Response | None = None
        try:
            async with driver.transaction():
                admitted = await self._admit(driver, may_roll_over=may_roll_over)
                if isinstance(admitted, Response):
                    return admitted
                assert self.user_id is not None
                idem_id = await idempotency.claim(
                    driver,
                    user_id=self.user_id,
                    key=self.idempotency_key,
                    digest=self.digest,
                    tool_id=self.tool_id,
                    now=self.now,
                )
                if idem_id is None:  # another request claimed it since our read
                    raise _KeyTaken(
                        await idempotency.lookup(
                            driver, user_id=self.user_id, key=self.idempotency_key, now=self.now
                        )
                    )
                await ledger.link_key(driver, idem_id, admitted.log_id)
                admitted.row = {**admitted.row, "idem_id": idem_id}
                return admitted
        except BaseException as exc:  # rolled back: our admission goes, the other request's stands
            if isinstance(admitted, _Admitted):
                await self.rt.breakers.release(self.tool_key, admitted.permit)
            if not isinstance(exc, _KeyTaken):
                raise
            quota = _quota(admitted.row) if isinstance(admitted, _Admitted) else None
            headers = quota.headers() if quota else {}
            if exc.stored is None:
                raise IdempotencyConflict(
                    "A request with this Idempotency-Key is still in progress", headers=headers
                ) from None
            return idempotency.replay(exc.stored, self.digest, headers)

    async def _prechecks(self, version: ToolVersion | None) -> tuple[list[dict[str, Any]], Permit | None]:
        """Step 1 for the tool version this process knows: the input's errors, then (input
        valid) the breaker's permit. Neither when the version is unknown; a big input and a due
        trial wait until the statement has cleared the caller (`cleared`)."""
        if version is None or (len(self.body) > PRECHECK_MAX_BYTES and not self.cleared):
            return [], None
        errors = version.input_errors(self.value)
        if errors:
            return errors, None
        permit = await self.rt.breakers.acquire(
            self.tool_key,
            lease_seconds=version.timeout_seconds + TRIAL_LEASE_SLACK_SECONDS,
            claim_trial=self.cleared,
        )
        return [], permit

    async def _admit(self, driver: Any, *, may_roll_over: bool) -> _Admitted | Response:
        """READ_AND_ADMIT after the checks only Python can make; re-run when the tool turned out
        new or edited, or when a deferred check may now be made. Returns the admission or an
        idempotent replay; raises every refusal, and `_RollOver` when the period is over."""
        for tries_left in reversed(range(MAX_ADMIT_TRIES)):
            version = self.rt.tool_versions.get(self.tool_id)
            errors, permit = await self._prechecks(version)
            log_id = uuid.uuid4()
            try:
                row = await ledger.read_and_admit(
                    driver,
                    ledger.AdmitRequest(
                        tool_id=self.tool_id,
                        credential=self.credential,
                        idempotency_key=self.idempotency_key,
                        now=self.now,
                        reserve=token_count.reservation(len(self.body)),
                        request_id=current_request_id(),
                        tool_version=version.updated_at if version is not None else None,
                        go=permit is not None and permit.allowed,
                    ),
                    log_id,
                )
            except BaseException:
                if permit is not None:
                    await self.rt.breakers.release(self.tool_key, permit)
                raise
            if row["user_id"] is not None:
                self.user_id = row["user_id"]
                user_id_var.set(str(self.user_id))  # this task's log lines
            if row["admitted"]:
                assert permit is not None
                if permit.trial:
                    metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["half_open"])
                return _Admitted(dict(row), log_id, permit)
            if permit is not None:
                await self.rt.breakers.release(self.tool_key, permit)
            if row["user_id"] is None:
                raise InvalidToken()  # the session was revoked, the key disabled, the user disabled
            if row["idem_state"] is not None and self.digest is not None:
                return self._replay(row)
            if may_roll_over and _is_due(row, self.now):
                raise _RollOver(row["user_id"])
            if not tries_left:
                break
            if row["tool_id"] is not None and row["tool_changed"]:
                self.rt.tool_versions.learn(
                    self.tool_id, row["tool_updated_at"], row["timeout_seconds"], row["schema_text"]
                )
                continue
            deferred = not errors and (permit is None or permit.trial_due)
            if deferred and not self.cleared and self._sql_refusal(row) is None:
                # every check SQL makes passed; what held the call back was deferred until now
                self.cleared = True
                continue
            break
        return self._refuse(row, errors, permit)

    async def _roll_over(self, user_id: uuid.UUID) -> None:
        """Roll a subscription whose period is over forward (rare: once a period), then re-run."""
        async with self.app.state.sessionmaker() as session:
            await ensure_current(session, user_id, self.now)
            await session.commit()

    def _replay(self, row: Any) -> Response:
        assert self.digest is not None
        quota = _quota(row)
        stored = idempotency.StoredKey(
            row["idem_state"], bytes(row["idem_hash"]), row["idem_status"], row["idem_body"]
        )
        return idempotency.replay(stored, self.digest, quota.headers() if quota else {})

    def _sql_refusal(self, row: Any) -> AppError | None:
        """The first refusal the statement's own checks make, in the contract's order, or None."""
        quota = _quota(row)
        headers = quota.headers() if quota else {}
        if row["tool_id"] is None:
            return NotFound("Tool not found", headers=headers)
        if quota is None:
            return SubscriptionRequired()
        if row["min_rank"] is not None and row["plan_rank"] < row["min_rank"]:
            return PlanUpgradeRequired(headers=headers)
        if row["tokens_used"] + row["tokens_reserved"] >= row["token_limit"]:
            return _quota_exceeded(row["token_limit"], row["tokens_used"], row["current_period_end"], headers)
        return None

    def _refuse(self, row: Any, errors: list[dict[str, Any]], permit: Permit | None) -> NoReturn:
        """Why the statement admitted nothing, in the contract's order."""
        refusal = self._sql_refusal(row)
        if isinstance(refusal, QuotaExceeded):
            metrics.QUOTA_DENIALS.labels(row["plan_code"] or "").inc()
        if refusal is not None:
            raise refusal
        quota = _quota(row)
        headers = quota.headers() if quota else {}
        if row["tool_changed"] or (permit is None and not errors):
            # the tool was edited again and again while this call was being admitted
            raise ServiceUnavailable(
                "The tool changed while the call was admitted; retry", headers={**headers, "Retry-After": "1"}
            )
        if errors:
            raise ToolInputInvalid(
                "The input does not match the tool's input schema", details=errors, headers=headers
            )
        assert permit is not None
        if not permit.allowed:
            metrics.INVOCATIONS.labels(self.tool_key, "circuit_open").inc()
            raise ToolUnavailable(
                "The tool is temporarily unavailable (circuit open)",
                headers={**headers, "Retry-After": str(max(1, math.ceil(permit.retry_after or 1)))},
            )
        # every check passed on the read, but the row lock saw the quota taken by calls in flight
        metrics.QUOTA_DENIALS.labels(row["plan_code"] or "").inc()
        raise _quota_exceeded(row["token_limit"], row["tokens_used"], row["current_period_end"], headers)

    async def _call(self, admitted: _Admitted) -> Response:
        row, permit = admitted.row, admitted.permit
        target = upstream.Target(
            url=row["api_endpoint"],
            timeout_seconds=row["timeout_seconds"],
            max_attempts=1 if permit.trial else row["max_attempts"],
            label=self.tool_key,
            secret_header=(row["auth_header_name"], row["auth_header_value"])
            if row["auth_header_name"] and row["auth_header_value"]
            else None,
        )
        assert self.user_id is not None
        call = _Call(
            app=self.app,
            rt=self.rt,
            admission=ledger.Admission(admitted.log_id, row["admitted_plan"], row.get("idem_id")),
            permit=permit,
            target=target,
            body=self.body,
            user_id=self.user_id,
            tool_id=self.tool_id,
            tool_key=self.tool_key,
            quota=_quota(row),
            request_id=current_request_id() or "-",
        )
        return await call.run()


def _quota(row: Any) -> Quota | None:
    """The caller's quota as the statement read it; None without an active subscription."""
    if row["sub_id"] is None or row["sub_status"] != "active":
        return None
    return Quota(row["token_limit"], row["tokens_used"], row["current_period_end"])


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

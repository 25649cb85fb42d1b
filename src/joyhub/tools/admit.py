"""Steps 1 to 3 of an invocation (the whole flow: `gateway.py`): the checks made before the
admission statement, the statement and its re-runs, the refusals in the contract's order, and the
Idempotency-Key's claim. `AdmissionRun.run` ends with the call admitted (and the connection back
in the pool), an idempotent replay, or a refusal raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import asyncpg
from fastapi import FastAPI
from fastapi.responses import Response
from sqlalchemy.exc import TimeoutError as PoolTimeout

from joyhub.auth.dependencies import Credential
from joyhub.core import metrics
from joyhub.core.clock import iso_utc
from joyhub.core.context import current_request_id, user_id_var
from joyhub.core.db import connect_retried
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
    is_db_unavailable,
)
from joyhub.models import Subscription
from joyhub.subscriptions.rollover import ensure_current, is_due
from joyhub.tools import idempotency, ledger, token_count
from joyhub.tools.admission import AdmissionSlot
from joyhub.tools.breaker import Permit
from joyhub.tools.driver import driver_of
from joyhub.tools.runtime import Runtime
from joyhub.tools.tool_versions import ToolVersion

log = logging.getLogger("joyhub.tools.gateway")

TRIAL_LEASE_SLACK_SECONDS = 5.0

# Tries of the admission statement in one request: a tool version to learn, a check deferred
# until the caller is known (`AdmissionRun.cleared`), the answer — and one more for an edit racing.
MAX_ADMIT_TRIES = 4
# Inputs up to this size are checked against the schema before the statement; a bigger one only
# once the statement has found its caller authenticated and every other check passing, so an
# unauthenticated request cannot make the hub validate a megabyte.
PRECHECK_MAX_BYTES = 16 * 1024


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


def _is_due(row: Any, now: datetime) -> bool:
    """The rollover rule (`rollover.is_due`) applied to the subscription columns of the read."""
    if row["sub_id"] is None:
        return False
    # a plain stand-in for the ORM row: building a mapped instance costs more than the check
    probe = SimpleNamespace(
        status=row["sub_status"], current_period_end=row["current_period_end"], expires_at=row["expires_at"]
    )
    return is_due(cast(Subscription, probe), now)


@dataclass
class Admitted:
    """An admitted call: the statement's row, its usage log's id and the breaker's permit."""

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
class AdmissionRun:
    """Steps 1 to 3 for one request."""

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
    tried_log_ids: list[uuid.UUID] = field(default_factory=list)  # the statements' usage log ids
    fence: uuid.UUID | None = None  # the lost statement's log id, reused by the retry (`_recover`)
    fence_freed: bool = False  # the lost statement had committed, and was taken back

    @property
    def tool_key(self) -> str:
        return str(self.tool_id)

    async def run(self) -> Admitted | Response:
        """Admit the call (the admission committed, the connection and the line's slot given
        back), or answer an idempotent replay; refusals are raised."""
        rolled = False
        try:
            while True:
                try:
                    admitted = await self._admit_once(may_roll_over=not rolled, ping=self.fence is not None)
                    break
                except _RollOver as due:  # with the connection given back first
                    await self._roll_over(due.user_id)
                    rolled = True
                except Exception as exc:
                    if not await self._recover(exc):
                        raise
        except BaseException:
            if self.fence is not None:  # refused or failed after a lost statement: take it back
                with contextlib.suppress(Exception):  # best effort; else the sweep closes it
                    await ledger.undo_admissions(self.app.state.engine, [self.fence])
            raise
        finally:
            # the admission is durable (or refused), and the connection back in the pool: the
            # slot goes back before the upstream call
            if self.admission_slot is not None:
                self.admission_slot.release()
        return admitted

    async def _recover(self, exc: Exception) -> bool:
        """Whether to admit again after `exc`: once after a statement whose connection failed
        under it (without an Idempotency-Key), and once more when that lost statement turns out
        to have committed.

        We cannot know whether the lost statement committed, or whether it is still running on a
        backend that outlived our side of the connection. So the retry reuses its usage log id
        (`fence`): the log's primary key lets at most one of the two statements commit. A lost
        statement that commits later fails on the key and rolls back whole, reservation and all;
        one that committed first makes the retry fail on the key instead, and being committed it
        can be taken back (`ledger.undo_admissions`) before the last try.
        """
        if self.idempotency_key is not None:
            return False
        if self.fence is None and _connection_lost(exc):
            self.fence = self.tried_log_ids[-1] if self.tried_log_ids else uuid.uuid4()
            log.warning(
                "admission connection failed; admitting again under the same usage log id",
                extra={"tool_id": self.tool_key, "error": type(exc).__name__},
            )
            metrics.ADMISSION_RECOVERIES.inc()
            return True
        if self.fence is not None and not self.fence_freed and _fence_taken(exc):
            await ledger.undo_admissions(self.app.state.engine, [self.fence])
            self.fence_freed = True
            return True
        return False

    async def _admit_once(self, *, may_roll_over: bool, ping: bool) -> Admitted | Response:
        """One connection's worth of admitting. Without an Idempotency-Key the connection comes
        without the pre-ping when it was used within the last second (`db.connect_retried`):
        `run` admits again when the connection turns out dead (`_recover`). With a key the
        statement runs in a transaction with the claim, on a pinged connection, as before."""
        engine = self.app.state.engine
        if self.idempotency_key is None and not ping:
            connection = connect_retried(engine)
        else:
            connection = engine.connect()
        async with connection as conn:
            try:
                driver = await driver_of(conn)
                if self.idempotency_key is None:
                    # one statement, committed on its own: a refusal writes nothing but an API
                    # key's last-used stamp
                    return await self._admit(driver, may_roll_over=may_roll_over)
                return await self._admit_with_key(driver, may_roll_over=may_roll_over)
            except Exception as exc:
                if _connection_lost(exc):
                    # asyncpg raised it, not SQLAlchemy: tell the pool this connection is done
                    await conn.invalidate()
                raise

    async def _admit_with_key(self, driver: Any, *, may_roll_over: bool) -> Admitted | Response:
        """The admission and the key's claim in one transaction: both or neither."""
        assert self.idempotency_key is not None and self.digest is not None
        admitted: Admitted | Response | None = None
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
            if isinstance(admitted, Admitted):
                await self.rt.breakers.release(self.tool_key, admitted.permit)
            if not isinstance(exc, _KeyTaken):
                raise
            headers = quota_headers(admitted.row) if isinstance(admitted, Admitted) else {}
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

    async def _admit(self, driver: Any, *, may_roll_over: bool) -> Admitted | Response:
        """READ_AND_ADMIT after the checks only Python can make; re-run when the tool turned out
        new or edited, or when a deferred check may now be made. Returns the admission or an
        idempotent replay; raises every refusal, and `_RollOver` when the period is over."""
        for tries_left in reversed(range(MAX_ADMIT_TRIES)):
            version = self.rt.tool_versions.get(self.tool_id)
            errors, permit = await self._prechecks(version)
            log_id = self.fence or uuid.uuid4()
            self.tried_log_ids.append(log_id)
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
                return Admitted(dict(row), log_id, permit)
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
        stored = idempotency.StoredKey(
            row["idem_state"], bytes(row["idem_hash"]), row["idem_status"], row["idem_body"]
        )
        return idempotency.replay(stored, self.digest, quota_headers(row))

    def _sql_refusal(self, row: Any) -> AppError | None:
        """The first refusal the statement's own checks make, in the contract's order, or None."""
        quota = quota_of(row)
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
        headers = quota_headers(row)
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


def _fence_taken(exc: BaseException) -> bool:
    """The statement failed on the usage log's primary key: its id was taken (`_recover`)."""
    return isinstance(exc, asyncpg.exceptions.UniqueViolationError) and exc.constraint_name == "pk_usage_logs"


def _connection_lost(exc: BaseException) -> bool:
    """The connection failed under the statement (not a pool that ran dry: waiting again for a
    connection to undo and retry would only wait longer)."""
    return is_db_unavailable(exc) and not isinstance(exc, PoolTimeout)


def quota_headers(row: Any) -> dict[str, str]:
    """The quota headers for the caller the statement read (none without an active subscription)."""
    quota = quota_of(row)
    return quota.headers() if quota else {}


def quota_of(row: Any) -> Quota | None:
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

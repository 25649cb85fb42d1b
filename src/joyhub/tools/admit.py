"""Steps 1 to 3 of an invocation (the whole flow: `gateway.py`): the checks made before the
admission statement, the statement and its re-runs, the refusals in the contract's order, and the
Idempotency-Key's claim. `AdmissionRun.run` ends with the call admitted (and its connection free
for the next statement, `db.Releases`), an idempotent replay, or a refusal raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, NoReturn

from joyhub.core import metrics
from joyhub.core.clock import iso_utc
from joyhub.core.context import current_request_id, user_id_var
from joyhub.core.errors import (
    AppError,
    IdempotencyConflict,
    InvalidToken,
    NotFound,
    PlanUpgradeRequired,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    SubscriptionRequired,
    ToolInputInvalid,
    ToolUnavailable,
    ValidationFailed,
    field_error,
)
from joyhub.subscriptions.rollover import is_due
from joyhub.tools import idempotency, protocols, token_count
from joyhub.tools.admission import AdmissionSlot
from joyhub.tools.breaker import Permit
from joyhub.tools.idempotency import StoredKey
from joyhub.tools.metering import (
    Admission,
    AdmissionRead,
    AdmitRequest,
    AdmitResult,
    MeteringConnection,
    Quota,
    connection_lost,
    log_id_taken,
)
from joyhub.tools.outcomes import InvocationRequest, Replay, account_headers, quota_headers
from joyhub.tools.rate_limits import NO_LIMITS, Limits, count_refusal
from joyhub.tools.tool_versions import ToolVersion

if TYPE_CHECKING:
    from joyhub.tools.gateway import Gateway

log = logging.getLogger("joyhub.tools.gateway")

TRIAL_LEASE_SLACK_SECONDS = 5.0

# Tries of the admission statement in one request: a tool version to learn, a check deferred
# until the caller is known (`AdmissionRun.cleared`), the answer — and one more for an edit racing.
MAX_ADMIT_TRIES = 4
# Inputs up to this size are checked against the schema before the statement; a bigger one only
# once the statement has found its caller authenticated and every other check passing, so an
# unauthenticated request cannot make the hub validate a megabyte.
PRECHECK_MAX_BYTES = 16 * 1024
# `stream: true` for a tool that does not stream (API.md §5.1): refused where the input is checked
STREAM_REFUSED = field_error("body.stream", "This tool does not stream; omit stream or set it to false")


@dataclass(frozen=True)
class Admitted:
    """An admitted call and the circuit breaker's permit it was admitted under."""

    admission: Admission
    permit: Permit


# how a statement is run: on the request's own connection, or group-committed
Admit = Callable[[AdmitRequest], Awaitable[AdmitResult]]


class _KeyTaken(Exception):
    """The idempotency claim lost to a request that claimed the key after our read."""

    def __init__(self, stored: StoredKey | None) -> None:
        super().__init__("idempotency key taken")
        self.stored = stored


class _RollOver(Exception):
    """The caller's subscription period is over: roll it forward, then admit again."""

    def __init__(self, subscription_id: uuid.UUID) -> None:
        super().__init__("subscription period over")
        self.subscription_id = subscription_id


@dataclass
class AdmissionRun:
    """Steps 1 to 3 for one request."""

    gateway: Gateway
    request: InvocationRequest
    body: bytes  # the input as the upstream will get it
    digest: bytes | None  # the request's hash, with an Idempotency-Key
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
        return str(self.request.tool_id)

    @property
    def vouched(self) -> bool:
        """Whether the caller is known well enough to do schema work for before the statement:
        an access token (its signature verified), an API key this process has seen pass the
        credential rule lately (`vouched.py`), or anyone a statement has cleared."""
        credential = self.request.credential
        return (
            self.cleared
            or credential.api_key_digest is None
            or credential.api_key_digest in self.gateway.recent_keys
        )

    async def run(self) -> Admitted | Replay:
        """Admit the call (the admission committed, the connection and the line's slot given
        back), or answer an idempotent replay; refusals are raised."""
        rolled = False
        try:
            while True:
                try:
                    admitted = await self._admit_once(may_roll_over=not rolled, ping=self.fence is not None)
                    break
                except _RollOver as due:  # with the connection given back first
                    await self.gateway.roll_over(due.subscription_id, self.now)
                    rolled = True
                except Exception as exc:
                    if not await self._recover(exc):
                        raise
        except BaseException:
            if self.fence is not None:  # refused or failed after a lost statement: take it back
                with contextlib.suppress(Exception):  # best effort; else the sweep closes it
                    await self.gateway.store.undo_admissions([self.fence], self.now)
            raise
        finally:
            # the admission is durable (or refused), and its connection free for the next
            # statement (`db.Releases`): the slot goes back before the upstream call
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
        can be taken back (`MeteringStore.undo_admissions`) before the last try.
        """
        if self.request.idempotency_key is not None:
            return False
        if self.fence is None and connection_lost(exc):
            self.fence = self.tried_log_ids[-1] if self.tried_log_ids else uuid.uuid4()
            log.warning(
                "admission connection failed; admitting again under the same usage log id",
                extra={"tool_id": self.tool_key, "error": type(exc).__name__},
            )
            metrics.ADMISSION_RECOVERIES.inc()
            return True
        if self.fence is not None and not self.fence_freed and log_id_taken(exc):
            await self.gateway.store.undo_admissions([self.fence], self.now)
            self.fence_freed = True
            return True
        return False

    async def _admit_once(self, *, may_roll_over: bool, ping: bool) -> Admitted | Replay:
        """One round of admitting. Without an Idempotency-Key the statement commits on its own (a
        refusal writes nothing but an API key's last-used stamp and the refusal counters) and is
        group-committed with other calls to the same tool (`group_commit.py`), on a connection taken
        without the pre-ping: `run` admits again, alone and on a pinged connection, when it
        turns out dead (`_recover`). With a key the statement runs in a transaction with the
        claim, on a pinged connection."""
        if self.request.idempotency_key is None and not ping:
            return await self._admit(self.gateway.admit_batched, may_roll_over=may_roll_over)
        async with self.gateway.store.connection(ping=True) as conn:
            if self.request.idempotency_key is None:
                return await self._admit(conn.admit, may_roll_over=may_roll_over)
            return await self._admit_with_key(conn, may_roll_over=may_roll_over)

    async def _admit_with_key(self, conn: MeteringConnection, *, may_roll_over: bool) -> Admitted | Replay:
        """The admission and the key's claim in one transaction: both or neither."""
        key, digest = self.request.idempotency_key, self.digest
        assert key is not None and digest is not None
        admitted: Admitted | Replay | None = None
        try:
            async with conn.transaction():
                admitted = await self._admit(conn.admit, may_roll_over=may_roll_over)
                if isinstance(admitted, Replay):
                    return admitted
                user_id = admitted.admission.user_id
                idem_id = await conn.claim_key(
                    user_id=user_id, key=key, digest=digest, tool_id=self.request.tool_id, now=self.now
                )
                if idem_id is None:  # another request claimed it since our read
                    raise _KeyTaken(await conn.lookup_key(user_id=user_id, key=key, now=self.now))
                await conn.link_key(idem_id, admitted.admission.log_id)
                return Admitted(replace(admitted.admission, idem_id=idem_id), admitted.permit)
        except BaseException as exc:  # rolled back: our admission goes, the other request's stands
            if isinstance(admitted, Admitted):
                await self.gateway.breakers.release(self.tool_key, admitted.permit)
            if not isinstance(exc, _KeyTaken):
                raise
            quota = admitted.admission.quota if isinstance(admitted, Admitted) else None
            if exc.stored is None:
                raise IdempotencyConflict(
                    "A request with this Idempotency-Key is still in progress", headers=quota_headers(quota)
                ) from None
            return self._replay(exc.stored, quota, NO_LIMITS)

    async def _prechecks(self, version: ToolVersion | None) -> tuple[list[dict[str, object]], Permit | None]:
        """Step 1 for the tool version this process knows: the input's errors, then (input
        valid) the breaker's permit. Neither when the version is unknown or the caller not yet
        vouched for (an API key this process has not seen lately); a big input and a due trial
        wait until the statement has cleared the caller (`cleared`)."""
        if version is None or not self.vouched:
            return [], None
        if len(self.body) > PRECHECK_MAX_BYTES and not self.cleared:
            return [], None
        if self.request.stream and not version.streaming:
            return [STREAM_REFUSED], None
        errors = await version.input_errors_async(self.request.input, len(self.body))
        if errors:
            return errors, None
        permit = await self.gateway.breakers.acquire(
            self.tool_key,
            lease_seconds=version.timeout_seconds + TRIAL_LEASE_SLACK_SECONDS,
            claim_trial=self.cleared,
        )
        return [], permit

    async def _admit(self, admit: Admit, *, may_roll_over: bool) -> Admitted | Replay:
        """The admission statement after the checks only Python can make; re-run when the tool
        turned out new or edited, or when a deferred check may now be made. Returns the admission
        or an idempotent replay; raises every refusal, and `_RollOver` when the period is over."""
        gw = self.gateway
        for tries_left in reversed(range(MAX_ADMIT_TRIES)):
            version = gw.tool_versions.get(self.request.tool_id)
            errors, permit = await self._prechecks(version)
            log_id = self.fence or uuid.uuid4()
            self.tried_log_ids.append(log_id)
            try:
                result = await admit(
                    AdmitRequest(
                        tool_id=self.request.tool_id,
                        credential=self.request.credential,
                        idempotency_key=self.request.idempotency_key,
                        now=self.now,
                        reserve=token_count.reservation(len(self.body)),
                        request_id=current_request_id(),
                        tool_version=version.updated_at if version is not None else None,
                        go=permit is not None and permit.allowed,
                        log_id=log_id,
                    )
                )
            except BaseException:
                if permit is not None:
                    await gw.breakers.release(self.tool_key, permit)
                raise
            read = result.read
            if read.user_id is not None:
                self.user_id = read.user_id
                user_id_var.set(str(self.user_id))  # this task's log lines
                if self.request.credential.api_key_digest is not None:
                    gw.recent_keys.add(self.request.credential.api_key_digest)
            if result.admission is not None:
                assert permit is not None
                if permit.trial:
                    metrics.CIRCUIT_STATE.labels(self.tool_key).set(metrics.CIRCUIT_STATE_VALUES["half_open"])
                return Admitted(result.admission, permit)
            if permit is not None:
                await gw.breakers.release(self.tool_key, permit)
            if read.user_id is None:
                raise InvalidToken()  # the session was revoked, the key disabled, the user disabled
            if read.stored is not None and self.digest is not None:
                return self._replay(read.stored, read.account.quota if read.account else None, read.limits)
            if may_roll_over and read.account is not None and is_due(read.account, self.now):
                raise _RollOver(read.account.subscription_id)
            if not tries_left:
                break
            if read.tool is not None and read.tool.changed:
                gw.tool_versions.learn(
                    self.request.tool_id,
                    read.tool.updated_at,
                    read.tool.timeout_seconds,
                    read.tool.schema_text,
                    # an OpenAI-compatible upstream streams whenever it is asked to (API.md §12)
                    read.tool.streaming or read.tool.protocol == protocols.OPENAI,
                )
                continue
            deferred = not errors and (permit is None or permit.trial_due)
            if deferred and not self.cleared and sql_refusal(read, self.now) is None:
                # every check SQL makes passed; what held the call back was deferred until now
                self.cleared = True
                continue
            break
        self._refuse(read, errors, permit)

    def _replay(self, stored: StoredKey, quota: Quota | None, limits: Limits) -> Replay:
        assert self.digest is not None
        answer = idempotency.replayable(stored, self.digest, account_headers(quota, limits))
        return Replay(answer.status, answer.body, quota, answer.media_type, limits)

    def _refuse(
        self, read: AdmissionRead, errors: list[dict[str, object]], permit: Permit | None
    ) -> NoReturn:
        """Why the statement admitted nothing, in the contract's order."""
        refusal = sql_refusal(read, self.now)
        account = read.account
        if isinstance(refusal, QuotaExceeded):
            metrics.QUOTA_DENIALS.labels(account.plan_code if account else "").inc()
        if isinstance(refusal, RateLimited):
            count_refusal(refusal)
        if refusal is not None:
            raise refusal
        assert read.tool is not None and account is not None
        headers = account_headers(account.quota, read.limits)
        if read.tool.changed or (permit is None and not errors):
            # the tool was edited again and again while this call was being admitted
            raise ServiceUnavailable(
                "The tool changed while the call was admitted; retry", headers={**headers, "Retry-After": "1"}
            )
        if errors == [STREAM_REFUSED]:
            raise ValidationFailed(details=errors, headers=headers)
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
        metrics.QUOTA_DENIALS.labels(account.plan_code).inc()
        raise quota_exceeded(account.token_limit, account.tokens_used, account.current_period_end, headers)


def sql_refusal(read: AdmissionRead, now: datetime) -> AppError | None:
    """The first refusal the statement's own checks make, in the contract's order, or None."""
    account = read.account
    quota = account.quota if account is not None else None
    headers = account_headers(quota, read.limits)
    if read.org_denied:  # `X-Org-ID` of an organization the caller does not belong to
        return NotFound("Organization not found")
    if read.tool is None:
        return NotFound("Tool not found", headers=headers)
    if account is None or quota is None:
        return SubscriptionRequired()
    if read.tool.min_rank is not None and account.plan_rank < read.tool.min_rank:
        return PlanUpgradeRequired(headers=headers)
    limited = read.limits.refusal(now, headers)
    if limited is not None:
        return limited
    if not account.tokens_left:
        return quota_exceeded(account.token_limit, account.tokens_used, account.current_period_end, headers)
    member = read.member
    if member is not None and member.token_limit is not None and not member.tokens_left:
        end = account.current_period_end
        return member_quota_exceeded(member.token_limit, member.tokens_used, end, headers)
    return None


def member_quota_exceeded(
    limit: int, used: int, period_end: datetime, headers: dict[str, str]
) -> QuotaExceeded:
    """The member's own limit within their organization is used up (API.md §13)."""
    return QuotaExceeded(
        "Your token limit in this organization is used up for this period",
        details=[
            {
                "field": None,
                "message": "No tokens left of your limit in this organization for this billing period",
                "scope": "member",
                "token_limit": limit,
                "tokens_used": used,
                "period_end": iso_utc(period_end),
            }
        ],
        headers=headers,
    )


def quota_exceeded(limit: int, used: int, period_end: datetime, headers: dict[str, str]) -> QuotaExceeded:
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

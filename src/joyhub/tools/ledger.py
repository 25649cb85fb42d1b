"""The accounting of invocations (API.md §5, guarantees 1 to 3): admit, settle, and the stale sweep.

- **admit** is one conditional statement (`READ_AND_ADMIT`, which also does the gateway's read):
  reserve the call's estimated tokens on the subscription *only if* `tokens_used +
  tokens_reserved` is still under the plan's limit, and insert the `pending` usage log — both or
  neither. Tokens of calls still in flight count, so concurrent calls at the edge cannot all
  pass; the overshoot is bounded by the calls already in flight. The same statement checks the
  caller's credential and reads what the gateway needs, so an invocation is admitted in one
  round trip; it commits on its own, or with the idempotency claim in one transaction, before
  the upstream call.
- **settle** is one transaction: the usage log gets its outcome (guarded by
  `status = 'pending'`, so a call is never settled twice), the subscription is charged and its
  reservation released, the idempotency record stores the response, and the daily/hourly
  rollups are bumped. The log's `timestamp` is the settle time, clamped into the period the
  tokens were charged to, so `tokens_used` always equals the sum of the current period's logs.
- **sweep**: a call whose worker died is closed as `error` (`ABANDONED`, 0 tokens) once it is
  older than both STALE_INVOCATION_SECONDS and its tool's worst case (attempts times timeout plus
  backoff), and its reservation and idempotency claim are released.

No transaction or pooled connection is held while the upstream is called: admit and settle each
take a connection for one statement (a few with an idempotency key) and give it back.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.auth.dependencies import API_KEY_TOUCH_INTERVAL, Credential, credential_user_sql
from joyhub.core.config import Settings
from joyhub.core.db import connect_retried
from joyhub.core.errors import is_db_unavailable, sqlstates
from joyhub.tools import idempotency
from joyhub.tools.driver import DriverSession, driver_of
from joyhub.usage import rollups
from joyhub.webhooks import quota_alerts

log = logging.getLogger("joyhub.tools.ledger")

STALE_SLACK_SECONDS = 60
ABANDONED = "ABANDONED"  # the error code of a call the sweep closed

# The authentication, the read and the admission in one statement, in one round trip:
# - `who` checks the caller's credential as the principal dependencies would (an access token's
#   session still live, or an API key active and unexpired; the user enabled:
#   `auth.dependencies.credential_user_sql`);
# - `touch` records an API key's use at most once a minute, best effort: a data-modifying CTE
#   nothing reads runs after the main query, so it would take the key's row lock *after* `adm`
#   took the subscription's — the reverse of every other route's order — and SKIP LOCKED means it
#   never waits for it;
# - `ctx` reads the tool, the caller's subscription and plan, the tool's minimum plan and any
#   live idempotency record (and the tool's input schema when the caller validated against
#   another version, `tool_versions.py`);
# - `adm` reserves the call's tokens only when every check passes: caller known, tool live, no
#   idempotency record, subscription active and current, plan rank, tokens left counting those
#   in flight, and — decided by the caller before the statement — input valid for this very tool
#   version and circuit closed. Its row lock makes concurrent admissions at the quota edge wait
#   and re-check the fresh row;
# - `log` writes the pending usage log.
# $1 tool, $2 session id, $3 token's user id, $4 API key digest, $5 idempotency key, $6 now,
# $7 reservation, $8 log id, $9 request id, $10 tool version validated against, $11 input valid
# and circuit closed, $12 touch the API key if last used before this.
READ_AND_ADMIT = (
    """
    WITH who AS ("""  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + credential_user_sql("$2", "$3", "$4", "$6")
    + """
    ), touch AS (
        UPDATE api_keys AS k SET last_used_at = $6
        WHERE k.id = (
            SELECT tk.id FROM api_keys AS tk JOIN who ON who.user_id = tk.user_id
            WHERE tk.key_hash = $4 AND (tk.last_used_at IS NULL OR tk.last_used_at < $12)
            FOR NO KEY UPDATE OF tk SKIP LOCKED)
    ), ctx AS (
        SELECT who.user_id, t.id AS tool_id, t.api_endpoint, t.timeout_seconds, t.max_attempts,
               t.auth_header_name, t.auth_header_value, t.updated_at AS tool_updated_at,
               t.updated_at IS DISTINCT FROM $10 AS tool_changed,
               CASE WHEN t.updated_at IS DISTINCT FROM $10 THEN t.input_schema::text END AS schema_text,
               mp.rank AS min_rank,
               s.id AS sub_id, s.status AS sub_status, s.plan_code, s.tokens_used, s.tokens_reserved,
               s.current_period_end, s.expires_at, p.token_limit, p.rank AS plan_rank,
               kk.state AS idem_state, kk.request_hash AS idem_hash,
               kk.response_status AS idem_status, kk.response_body::text AS idem_body
        FROM (SELECT 1) AS one
        LEFT JOIN who ON true
        LEFT JOIN tools AS t ON t.id = $1 AND t.deleted_at IS NULL AND t.is_active
        LEFT JOIN plans AS mp ON mp.code = t.min_plan_code
        LEFT JOIN subscriptions AS s ON s.user_id = who.user_id
        LEFT JOIN plans AS p ON p.code = s.plan_code
        LEFT JOIN idempotency_keys AS kk
               ON kk.user_id = who.user_id AND kk.key = $5 AND kk.expires_at > $6
    ), adm AS (
        UPDATE subscriptions AS s
        SET tokens_reserved = s.tokens_reserved + $7, inflight = s.inflight + 1
        FROM ctx
        WHERE s.id = ctx.sub_id AND ctx.tool_id IS NOT NULL AND ctx.idem_state IS NULL
          AND ctx.tool_updated_at = $10 AND $11::boolean
          AND s.status = 'active' AND s.current_period_end > $6
          AND (s.expires_at IS NULL OR s.expires_at > $6)
          AND (ctx.min_rank IS NULL OR ctx.plan_rank >= ctx.min_rank)
          AND s.tokens_used + s.tokens_reserved
              < (SELECT p2.token_limit FROM plans AS p2 WHERE p2.code = s.plan_code)
        RETURNING s.id, s.plan_code, s.user_id
    ), log AS (
        INSERT INTO usage_logs (id, user_id, tool_id, subscription_id, plan_code, status,
                                started_at, "timestamp", tokens_used, tokens_reserved, request_id)
        SELECT $8::uuid, adm.user_id, $1, adm.id, adm.plan_code, 'pending', $6, $6, 0, $7, $9::varchar
        FROM adm
        RETURNING plan_code
    )
    SELECT ctx.*, log.plan_code AS admitted_plan, log.plan_code IS NOT NULL AS admitted
    FROM ctx LEFT JOIN log ON true
    """
)

_LINK_KEY = "UPDATE idempotency_keys SET usage_log_id = $2 WHERE id = $1"

# Settle in one statement (so in one implicit transaction and one round trip): `l` locks the
# pending log (a log the sweep closed meanwhile is no longer pending, so nothing below happens
# and the statement returns no row); `sub` charges the tokens and releases the reservation;
# `stamp` is the settle time clamped into the period the tokens were charged to (so tokens_used
# always equals the sum of the current period's logs); `log` writes the outcome; `idem` stores
# the response for replay; `settled` feeds the rollup upserts (`rollups.ROLLUP_CTES`); the
# quota thresholds this settle crosses are decided and written from `sub` (`quota_alerts`).
_SETTLE = text(
    """
    WITH l AS (
        SELECT id, subscription_id, tokens_reserved FROM usage_logs
        WHERE id = :log_id AND status = 'pending'
        FOR UPDATE
    ), sub AS (
        UPDATE subscriptions AS s
        SET tokens_used = s.tokens_used + CAST(:tokens AS bigint),
            tokens_reserved = GREATEST(s.tokens_reserved - l.tokens_reserved, 0),
            inflight = GREATEST(s.inflight - 1, 0)
        FROM l WHERE s.id = l.subscription_id
        RETURNING s.id, s.user_id, s.tokens_used - CAST(:tokens AS bigint) AS tokens_before,
                  s.tokens_used, s.current_period_start, s.current_period_end,
                  (SELECT p.token_limit FROM plans AS p WHERE p.code = s.plan_code) AS token_limit
    ), stamp AS (
        SELECT l.id, COALESCE(
            (SELECT LEAST(GREATEST(CAST(:now AS timestamptz), sub.current_period_start),
                          sub.current_period_end - interval '1 microsecond') FROM sub),
            CAST(:now AS timestamptz)) AS ts
        FROM l
    ), log AS (
        UPDATE usage_logs AS u
        SET status = :status, tokens_used = CAST(:tokens AS bigint), duration_ms = :duration_ms,
            "timestamp" = stamp.ts, error_code = :error_code
        FROM stamp WHERE u.id = stamp.id
        RETURNING u.id, u.user_id, u.tool_id, u.plan_code, u."timestamp"
    ), idem AS (
        UPDATE idempotency_keys
        SET state = 'done', response_status = :response_status,
            response_body = CAST(:response_body AS jsonb), usage_log_id = :log_id
        WHERE id = :idem_id
    ), settled AS (
        SELECT user_id, tool_id, COALESCE(plan_code, '') AS plan_code, CAST(:shard AS integer) AS shard,
               "timestamp" AS ts, CAST(:success AS integer) AS success,
               CAST(:error AS integer) AS error, CAST(:timeout AS integer) AS timeout,
               CAST(:tokens AS bigint) AS tokens
        FROM log
    ), """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + rollups.ROLLUP_CTES
    + ", "
    + quota_alerts.QUOTA_ALERT_CTES
    + """
    SELECT log.id, sub.tokens_used, sub.current_period_end, sub.token_limit
    FROM log LEFT JOIN sub ON true
    """
)


@dataclass(frozen=True)
class Admission:
    log_id: uuid.UUID
    plan_code: str | None
    idem_id: uuid.UUID | None


@dataclass(frozen=True)
class AdmitRequest:
    """What READ_AND_ADMIT is asked: who calls which tool, and what was decided beforehand."""

    tool_id: uuid.UUID
    credential: Credential
    idempotency_key: str | None
    now: datetime
    reserve: int
    request_id: str | None
    tool_version: datetime | None  # the tool's updated_at the input was validated against
    go: bool  # the input is valid for that version and the circuit let the call through


async def read_and_admit(driver: Any, req: AdmitRequest, log_id: uuid.UUID) -> Any:
    """Run READ_AND_ADMIT on an asyncpg connection (autocommit, or the caller's transaction)."""
    cred = req.credential
    return await driver.fetchrow(
        READ_AND_ADMIT,
        req.tool_id,
        cred.session_id,
        cred.user_id,
        cred.api_key_digest,
        req.idempotency_key,
        req.now,
        req.reserve,
        log_id,
        req.request_id,
        req.tool_version,
        req.go,
        req.now - API_KEY_TOUCH_INTERVAL,
    )


async def link_key(driver: Any, idem_id: uuid.UUID, log_id: uuid.UUID) -> None:
    await driver.execute(_LINK_KEY, idem_id, log_id)


# Undo admissions whose reply was lost (their connection failed under the statement): their
# pending logs go, with their reservations. A no-op for a statement that never ran. Nothing else
# refers to such a log — no call was made for it, and without an Idempotency-Key no key names it.
def _release_reservations(logs: str) -> str:
    """SQL giving back what the pending logs of the CTE `logs` hold on their subscriptions (the
    reserved tokens and the in-flight count): one rule for the sweep and the admission undo."""
    return f"""
        UPDATE subscriptions AS s
        SET tokens_reserved = GREATEST(s.tokens_reserved - x.reserved, 0),
            inflight = GREATEST(s.inflight - x.calls, 0)
        FROM (SELECT subscription_id, SUM(tokens_reserved) AS reserved, COUNT(*) AS calls
              FROM {logs} GROUP BY subscription_id) AS x
        WHERE s.id = x.subscription_id
    """  # noqa: S608 (a CTE name of ours, never a value)


_UNDO_ADMISSIONS = text(
    """
    WITH l AS (
        DELETE FROM usage_logs WHERE id = ANY(CAST(:log_ids AS uuid[])) AND status = 'pending'
        RETURNING subscription_id, tokens_reserved
    )"""  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + _release_reservations("l")
)


async def undo_admissions(engine: AsyncEngine, log_ids: list[uuid.UUID]) -> None:
    """Take back admissions made without an Idempotency-Key whose outcome is unknown."""
    if log_ids:
        async with engine.begin() as conn:
            await conn.execute(_UNDO_ADMISSIONS, {"log_ids": log_ids})


@dataclass(frozen=True)
class Settlement:
    settled: bool  # False when the sweep had already closed this call
    tokens_used: int | None = None
    token_limit: int | None = None
    period_end: datetime | None = None


SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0)


# serialization failure and deadlock: the statement lost a race and may simply be run again
_RETRYABLE_SQLSTATES = {"40001", "40P01"}


def _transient(exc: BaseException) -> bool:
    """A failure worth retrying: the database unreachable or restarting, the pool exhausted, a
    deadlock or serialization failure — whether SQLAlchemy wrapped it or asyncpg raised it."""
    return (
        isinstance(exc, PoolTimeout) or is_db_unavailable(exc) or bool(sqlstates(exc) & _RETRYABLE_SQLSTATES)
    )


async def settle(engine: AsyncEngine, **kw: Any) -> Settlement:
    """`settle_once`, retried a few times on transient database errors.

    A blip must not turn a completed call into one the sweep closes as abandoned. Retrying is
    safe: a first attempt that committed without us hearing back leaves nothing `pending`, so
    the retry settles nothing twice — and `_settled_before` then tells that case (charged, by the
    attempt whose reply was lost) from a call the sweep closed meanwhile (not charged).
    """
    retried = False
    for delay in SETTLE_RETRY_DELAYS:
        try:
            result = await settle_once(engine, **kw)
            break
        except Exception as exc:
            if not _transient(exc):
                raise
            log.warning(
                "settle failed; retrying",
                extra={"invocation_id": str(kw["admission"].log_id), "error": type(exc).__name__},
            )
            retried = True
            await asyncio.sleep(delay)
    else:
        result = await settle_once(engine, **kw)
    if result.settled:
        return result
    return await _settled_before(engine, kw["admission"].log_id, retried=retried, outcome=kw["status"])


_OUTCOME = text(
    """
    SELECT u.status, u.error_code, s.tokens_used, s.current_period_end,
           (SELECT p.token_limit FROM plans AS p WHERE p.code = s.plan_code) AS token_limit
    FROM usage_logs AS u LEFT JOIN subscriptions AS s ON s.id = u.subscription_id
    WHERE u.id = :log_id
    """
)


async def _settled_before(
    engine: AsyncEngine, log_id: uuid.UUID, *, retried: bool, outcome: str
) -> Settlement:
    """Why a settle found nothing pending: the sweep closed the call (not charged), or an
    earlier attempt of this very settle committed and only its reply was lost (charged)."""
    context = {"invocation_id": str(log_id), "outcome": outcome}
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(_OUTCOME, {"log_id": log_id})).first()
    except Exception as exc:  # only to say which it was: the call's outcome is settled either way
        log.warning(
            "could not tell how a settled call was settled", extra={**context, "error": type(exc).__name__}
        )
        return Settlement(False)
    if row is not None and retried and row.error_code != ABANDONED:
        log.info("settled by an earlier attempt whose reply was lost", extra=context)
        return Settlement(True, row.tokens_used, row.token_limit, row.current_period_end)
    if row is not None and row.error_code == ABANDONED:
        log.warning("invocation was already closed by the sweep; not charged", extra=context)
    else:
        log.warning("invocation was already settled; not charged again", extra=context)
    return Settlement(False)


async def settle_once(
    engine: AsyncEngine,
    *,
    admission: Admission,
    user_id: uuid.UUID,
    status: str,
    tokens: int,
    duration_ms: int,
    error_code: str | None,
    now: datetime,
    response_status: int,
    response_body: bytes,
) -> Settlement:
    """Write the outcome, charge, release, store the idempotent response, bump rollups: one statement.

    It runs on the bare asyncpg connection (`driver.DriverSession`) outside any explicit
    transaction: a single statement is atomic on its own, and needs no BEGIN/COMMIT round trips.
    """
    stored = idempotency.encode_response(response_body) if admission.idem_id is not None else None
    params = {
        "status": status,
        "tokens": tokens,
        "duration_ms": duration_ms,
        "now": now,
        "error_code": error_code,
        "log_id": admission.log_id,
        "response_status": response_status,
        "response_body": stored,
        "idem_id": admission.idem_id,
        "shard": rollups.platform_shard(user_id),
        "success": int(status == "success"),
        "error": int(status == "error"),
        "timeout": int(status == "timeout"),
    }
    async with connect_retried(engine) as conn:  # `settle` retries a dead connection
        try:
            row = await DriverSession(await driver_of(conn)).fetchrow(_SETTLE, params)
        except Exception as exc:
            if is_db_unavailable(exc) and not isinstance(exc, PoolTimeout):
                await conn.invalidate()  # asyncpg raised it, not SQLAlchemy: the pool must know
            raise
    if row is None:  # nothing pending: see `settle`
        return Settlement(False)
    return Settlement(True, row["tokens_used"], row["token_limit"], row["current_period_end"])


_CLOSE_STALE = text(
    """
    WITH stale AS (
        UPDATE usage_logs AS u
        SET status = 'error', error_code = :abandoned, tokens_used = 0, "timestamp" = :now,
            duration_ms = LEAST(EXTRACT(EPOCH FROM (CAST(:now AS timestamptz) - u.started_at)) * 1000,
                                2147483647)::int
        WHERE u.id IN (
            SELECT l.id FROM usage_logs AS l JOIN tools AS t ON t.id = l.tool_id
            WHERE l.status = 'pending' AND l.started_at < :cutoff
              AND l.started_at < CAST(:now AS timestamptz) - make_interval(
                    secs => t.timeout_seconds * t.max_attempts + 5 * t.max_attempts + :slack)
            ORDER BY l.started_at LIMIT 1000
            FOR UPDATE OF l SKIP LOCKED)
        RETURNING u.id, u.user_id, u.tool_id, u.plan_code, u.subscription_id, u.tokens_reserved
    ), released AS ("""  # noqa: S608 (constant SQL pieces joined at import; values are bound)
    + _release_reservations("stale")
    + """
    ), unclaimed AS (
        DELETE FROM idempotency_keys AS k USING stale
        WHERE k.usage_log_id = stale.id AND k.state = 'in_flight'
    )
    SELECT id, user_id, tool_id, plan_code FROM stale
    """
)


async def close_stale(session: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: close invocations whose worker died before settling them (guarantee 2)."""
    cutoff = now - timedelta(seconds=settings.stale_invocation_seconds)
    rows = (
        await session.execute(
            _CLOSE_STALE,
            {"now": now, "cutoff": cutoff, "slack": STALE_SLACK_SECONDS, "abandoned": ABANDONED},
        )
    ).all()

    # the stable order rollups asks for (tool, plan, shard), so two sweepers bumping shared
    # platform rows do not deadlock; any residual conflict is a retry at the next pass
    def order(r: Any) -> tuple[str, str, int, str]:
        return (str(r.tool_id), r.plan_code or "", rollups.platform_shard(r.user_id), str(r.user_id))

    for row in sorted(rows, key=order):
        await rollups.bump(
            session,
            user_id=row.user_id,
            tool_id=row.tool_id,
            plan_code=row.plan_code,
            ts=now,
            status="error",
            tokens=0,
        )
    if rows:
        log.warning("closed abandoned invocations", extra={"count": len(rows)})
    return len(rows)

"""The metering store: every statement of the invocation ledger, its rollups and its idempotency
records (API.md §5, guarantees 1 to 4), behind typed methods that return frozen dataclasses.

The ledger is keyed by the **subscription** — the billing account — not by the user: the
admission reads "the account this caller bills" in one place (the `account` CTE), and every
write after it (reservation, charge, release, the sweep) goes through the subscription id the
admission recorded on the usage log. Who may bill a subscription is therefore a question of that
one CTE, not of the ledger.

- **admit** is one conditional statement (`_ADMIT`), one round trip: it checks the caller's
  credential by the one rule (`auth/credentials.py`), reads the tool, the account and its plan,
  the tool's minimum plan and any live idempotency record, and — only when every check passes —
  reserves the call's estimated tokens (`tokens_reserved`, `inflight`) with a conditional update
  and writes the `pending` usage log: both or neither. Tokens of calls still in flight count, so
  concurrent calls at the quota edge cannot all pass; the overshoot is bounded by the calls
  already in flight. The row lock of the conditional update makes concurrent admissions of one
  account wait and re-check the fresh row.
- **settle** is one statement (`_SETTLE`, so one implicit transaction and one round trip): the
  usage log gets its outcome (guarded by `status = 'pending'`, so a call is never settled twice),
  the account is charged and its reservation released, the idempotency record stores the
  response, and the rollups are bumped (`usage/rollups.py`). The log's `timestamp` is the settle
  time clamped into the period the tokens were charged to, so `tokens_used` always equals the sum
  of the current period's logs.
- **the sweep** closes a call whose worker died (`ABANDONED`, 0 tokens) once it is older than
  both STALE_INVOCATION_SECONDS and its tool's worst case, releasing what it held; and forgets
  idempotency records older than 24 h.

Statements take named parameters and run on the bare asyncpg connection under a pooled
SQLAlchemy connection (`driver.DriverSession`): through the ORM each would cost more Python than
PostgreSQL spends on it. No transaction or pooled connection is held while an upstream is called:
admit and settle each take a connection for one statement (a few with an Idempotency-Key) and give
it back.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.auth.credentials import API_KEY_TOUCH_INTERVAL, CREDENTIAL_USERS, Credential
from joyhub.core.clock import iso_utc
from joyhub.core.config import Settings
from joyhub.core.db import connect_retried
from joyhub.core.errors import is_db_unavailable, sqlstates
from joyhub.tools.driver import DriverSession, Record, driver_of
from joyhub.tools.idempotency import KEY_TTL, StoredKey, encode_response
from joyhub.tools.rate_limits import NO_LIMITS, Bucket, Concurrency, Limits, Scope
from joyhub.usage import rollups

log = logging.getLogger("joyhub.tools.metering")

STALE_SLACK_SECONDS = 60
ABANDONED = "ABANDONED"  # the error code of a call the sweep closed
SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0)
# serialization failure and deadlock: the statement lost a race and may simply be run again
_RETRYABLE_SQLSTATES = {"40001", "40P01"}


# ---------------------------------------------------------------------------------------------
# What the statements return
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """An account's tokens for its current period, as a statement saw them."""

    limit: int
    used: int
    period_end: datetime

    def headers(self) -> dict[str, str]:
        """`X-Quota-*` (API.md §5); `X-Quota-Reset` is the period end as ISO 8601 UTC."""
        return {
            "X-Quota-Limit": str(self.limit),
            "X-Quota-Remaining": str(max(0, self.limit - self.used)),
            "X-Quota-Reset": iso_utc(self.period_end),
        }


@dataclass(frozen=True)
class ToolRead:
    """The tool as the admission read it (live and active; edits show up on the very next call)."""

    id: uuid.UUID
    api_endpoint: str
    timeout_seconds: int
    max_attempts: int
    secret_header: tuple[str, str] | None
    updated_at: datetime
    changed: bool  # not the version the caller validated the input against
    schema_text: str | None  # the current version's input schema (JSON text), when `changed`
    min_rank: int | None  # the rank of the tool's minimum plan
    streaming: bool  # the upstream answers Server-Sent Events


@dataclass(frozen=True)
class AccountRead:
    """The subscription the call bills, with its plan's limit and rank."""

    subscription_id: uuid.UUID
    status: str
    plan_code: str
    plan_rank: int
    token_limit: int
    tokens_used: int
    tokens_reserved: int
    current_period_end: datetime
    expires_at: datetime | None

    @property
    def quota(self) -> Quota | None:
        """The quota headers' source: only an active subscription has one."""
        if self.status != "active":
            return None
        return Quota(self.token_limit, self.tokens_used, self.current_period_end)

    @property
    def tokens_left(self) -> bool:
        return self.tokens_used + self.tokens_reserved < self.token_limit


@dataclass(frozen=True)
class AdmissionRead:
    """Everything the admission statement read, admitted or not."""

    user_id: uuid.UUID | None  # None: the credential no longer holds
    tool: ToolRead | None  # None: no such live, active tool
    account: AccountRead | None  # None: the caller never subscribed
    stored: StoredKey | None  # a live record of the request's Idempotency-Key
    limits: Limits = NO_LIMITS  # the rate and concurrency limits, as decided on the locked rows


@dataclass(frozen=True)
class Admission:
    """An admitted call: its pending usage log, the account it bills, the tool it calls."""

    log_id: uuid.UUID
    user_id: uuid.UUID
    subscription_id: uuid.UUID
    plan_code: str
    tool: ToolRead
    quota: Quota | None
    started_at: datetime
    tokens_left: int  # the account's tokens not used or held by other calls, as admitted
    limits: Limits = NO_LIMITS  # the limits as this admission left them (`X-RateLimit-*`)
    idem_id: uuid.UUID | None = None  # the Idempotency-Key's record, once claimed


@dataclass(frozen=True)
class AdmitResult:
    read: AdmissionRead
    admission: Admission | None  # None: refused (the read says why)


@dataclass(frozen=True)
class AdmitRequest:
    """What the admission statement is asked: who calls which tool, and what was decided before."""

    tool_id: uuid.UUID
    credential: Credential
    idempotency_key: str | None
    now: datetime
    reserve: int  # tokens held back while the call runs
    request_id: str | None
    tool_version: datetime | None  # the tool's updated_at the input was validated against
    go: bool  # the input is valid for that version and the circuit let the call through
    log_id: uuid.UUID


@dataclass(frozen=True)
class SettleRequest:
    """A call's outcome, to be written, charged and stored in one statement."""

    admission: Admission
    status: str  # success | error | timeout | cancelled
    tokens: int
    token_source: str  # reported | estimated
    duration_ms: int
    error_code: str | None
    now: datetime
    response_status: int
    response_body: bytes  # the exact answer, stored for an idempotent replay
    media_type: str = "application/json"


@dataclass(frozen=True)
class Settlement:
    settled: bool  # False when the sweep had already closed this call
    quota: Quota | None = None  # the account after the charge


# ---------------------------------------------------------------------------------------------
# The statements
# ---------------------------------------------------------------------------------------------

# The authentication, the read, the limits and the admission in one statement:
# - `who` is the one credential rule (`auth/credentials.py`);
# - `lk_key`, `lk_tool` and `account` lock what the call may change, in that order (each waits
#   for the one before through its sub-select, so every admission locks key → tool → account and
#   two admissions cannot deadlock): the caller's API key when it has its own rate limit, the tool
#   when it has one, and the subscription the caller bills (today: their own). Locked rows are
#   read as they are *now*, after any concurrent admission that held them, so every check below
#   sees exact numbers — the quota, the concurrency and each limit's GCRA state;
# - `touch` records an unlimited API key's use at most once a minute, best effort: SKIP LOCKED, so
#   it never waits (a limited key is stamped by `key_rate`: one statement must not update a row
#   twice);
# - `ctx` reads the tool, the account and its plan, the tool's minimum plan and any live
#   idempotency record (and the tool's input schema when the caller validated against another
#   version, `tool_versions.py`), and `checks` decides, in the contract's order;
# - `adm` reserves the call's tokens, counts it in flight and advances the plan's GCRA only when
#   every check passes — and, decided by the caller before the statement (`:go`), the input is
#   valid for this very tool version and the circuit closed; `key_rate` and `tool_rate` then
#   advance the key's and the tool's;
# - `limited` / `limited_platform` count a refusal by a rate or concurrency limit in the day's
#   rollups (a counter, not a row per refusal);
# - `log` writes the pending usage log.
# GCRA (API.md §4.1): a limit of L a minute admits a request at `now` when the bucket's
# theoretical arrival time, max(tat, now) + 60/L s, is at most 60 s ahead of `now`; admitting
# moves tat there. A burst of L passes at once, then one request every 60/L s, evenly.
_ADMIT = text(
    """
    WITH who AS ("""  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + CREDENTIAL_USERS
    + """
    ), lk_key AS (
        SELECT k.id, k.requests_per_minute AS rpm, k.rate_tat
        FROM api_keys AS k JOIN who ON who.api_key_id = k.id
        WHERE k.requests_per_minute IS NOT NULL
        FOR NO KEY UPDATE OF k
    ), lk_tool AS (
        SELECT t.id, t.requests_per_minute AS rpm, t.rate_tat
        FROM tools AS t
        WHERE t.id = :tool_id AND t.requests_per_minute IS NOT NULL AND t.deleted_at IS NULL AND t.is_active
          AND (SELECT count(*) FROM lk_key) >= 0
        FOR NO KEY UPDATE OF t
    ), account AS (
        SELECT s.* FROM subscriptions AS s JOIN who ON s.user_id = who.user_id
        WHERE (SELECT count(*) FROM lk_tool) >= 0
        FOR NO KEY UPDATE OF s
    ), touch AS (
        UPDATE api_keys AS k SET last_used_at = :now
        WHERE k.id = (
            SELECT tk.id FROM api_keys AS tk JOIN who ON who.api_key_id = tk.id
            WHERE (tk.last_used_at IS NULL OR tk.last_used_at < :touch_before)
              AND tk.requests_per_minute IS NULL
            FOR NO KEY UPDATE OF tk SKIP LOCKED)
    ), ctx AS (
        SELECT who.user_id, t.id AS tool_id, t.api_endpoint, t.timeout_seconds, t.max_attempts,
               t.auth_header_name, t.auth_header_value, t.updated_at AS tool_updated_at, t.streaming,
               t.updated_at IS DISTINCT FROM :tool_version AS tool_changed,
               CASE WHEN t.updated_at IS DISTINCT FROM :tool_version THEN t.input_schema::text END
                   AS schema_text,
               mp.rank AS min_rank,
               s.id AS sub_id, s.status AS sub_status, s.plan_code, s.tokens_used, s.tokens_reserved,
               s.current_period_end, s.expires_at, s.inflight, s.rate_tat AS plan_tat,
               p.token_limit, p.rank AS plan_rank, p.requests_per_minute AS plan_rpm, p.max_concurrent,
               lk_key.rpm AS key_rpm, lk_key.rate_tat AS key_tat,
               lk_tool.rpm AS tool_rpm, lk_tool.rate_tat AS tool_tat,
               kk.state AS idem_state, kk.request_hash AS idem_hash,
               kk.response_status AS idem_status, kk.response_body::text AS idem_body
        FROM (SELECT 1) AS one
        LEFT JOIN who ON true
        LEFT JOIN tools AS t ON t.id = :tool_id AND t.deleted_at IS NULL AND t.is_active
        LEFT JOIN plans AS mp ON mp.code = t.min_plan_code
        LEFT JOIN account AS s ON true
        LEFT JOIN plans AS p ON p.code = s.plan_code
        LEFT JOIN lk_key ON true
        LEFT JOIN lk_tool ON true
        LEFT JOIN idempotency_keys AS kk
               ON kk.user_id = who.user_id AND kk.key = :idempotency_key AND kk.expires_at > :now
    ), checks AS (
        SELECT ctx.*,
               ctx.user_id IS NOT NULL AND ctx.tool_id IS NOT NULL AND ctx.idem_state IS NULL
                 AND ctx.sub_status = 'active' AND ctx.current_period_end > :now
                 AND (ctx.expires_at IS NULL OR ctx.expires_at > :now)
                 AND (ctx.min_rank IS NULL OR ctx.plan_rank >= ctx.min_rank) AS gate_ok,
               ctx.plan_rpm IS NULL OR GREATEST(ctx.plan_tat, :now)
                 + make_interval(secs => 60.0 / ctx.plan_rpm) - :now <= interval '60 seconds' AS plan_rate_ok,
               ctx.key_rpm IS NULL OR GREATEST(ctx.key_tat, :now)
                 + make_interval(secs => 60.0 / ctx.key_rpm) - :now <= interval '60 seconds' AS key_rate_ok,
               ctx.tool_rpm IS NULL OR GREATEST(ctx.tool_tat, :now)
                 + make_interval(secs => 60.0 / ctx.tool_rpm) - :now <= interval '60 seconds' AS tool_rate_ok,
               ctx.max_concurrent IS NULL OR ctx.inflight < ctx.max_concurrent AS concurrency_ok
        FROM ctx
    ), adm AS (
        UPDATE subscriptions AS s
        SET tokens_reserved = s.tokens_reserved + :reserve, inflight = s.inflight + 1,
            rate_tat = CASE WHEN c.plan_rpm IS NULL THEN s.rate_tat
                            ELSE GREATEST(s.rate_tat, :now) + make_interval(secs => 60.0 / c.plan_rpm) END
        FROM checks AS c
        WHERE s.id = c.sub_id AND c.gate_ok
          AND c.plan_rate_ok AND c.key_rate_ok AND c.tool_rate_ok AND c.concurrency_ok
          AND s.tokens_used + s.tokens_reserved < c.token_limit
          AND c.tool_updated_at = :tool_version AND CAST(:go AS boolean)
        RETURNING s.id, s.plan_code, c.user_id, s.rate_tat
    ), key_rate AS (
        UPDATE api_keys AS k
        SET rate_tat = GREATEST(k.rate_tat, :now) + make_interval(secs => 60.0 / k.requests_per_minute),
            last_used_at = :now
        FROM adm, lk_key WHERE k.id = lk_key.id
        RETURNING k.rate_tat
    ), tool_rate AS (
        UPDATE tools AS t
        SET rate_tat = GREATEST(t.rate_tat, :now) + make_interval(secs => 60.0 / t.requests_per_minute)
        FROM adm, lk_tool WHERE t.id = lk_tool.id
        RETURNING t.rate_tat
    ), refused AS (
        SELECT c.user_id, c.tool_id, c.plan_code, get_byte(uuid_send(c.user_id), 15) % 16 AS shard
        FROM checks AS c
        WHERE c.gate_ok AND c.tool_updated_at = :tool_version
          AND NOT (c.plan_rate_ok AND c.key_rate_ok AND c.tool_rate_ok AND c.concurrency_ok)
    ), limited AS (
        INSERT INTO usage_daily AS d
            (user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, tokens, rate_limited)
        SELECT user_id, CAST(:now AS timestamptz) AT TIME ZONE 'UTC', tool_id, plan_code, 0, 0, 0, 0, 0, 1
        FROM refused
        ON CONFLICT (user_id, day, tool_id, plan_code) DO UPDATE SET rate_limited = d.rate_limited + 1
    ), limited_platform AS (
        INSERT INTO usage_platform_daily AS pd
            (day, tool_id, plan_code, shard, invocations, successes, errors, timeouts, tokens, rate_limited)
        SELECT CAST(:now AS timestamptz) AT TIME ZONE 'UTC', tool_id, plan_code, shard, 0, 0, 0, 0, 0, 1
        FROM refused
        ON CONFLICT (day, tool_id, plan_code, shard) DO UPDATE SET rate_limited = pd.rate_limited + 1
    ), log AS (
        INSERT INTO usage_logs (id, user_id, tool_id, subscription_id, plan_code, status,
                                started_at, "timestamp", tokens_used, tokens_reserved, request_id)
        SELECT CAST(:log_id AS uuid), adm.user_id, CAST(:tool_id AS uuid), adm.id, adm.plan_code,
               'pending', :now, :now, 0, :reserve, CAST(:request_id AS varchar)
        FROM adm
        RETURNING plan_code
    )
    SELECT checks.*, log.plan_code AS admitted_plan, adm.rate_tat AS new_plan_tat,
           key_rate.rate_tat AS new_key_tat, tool_rate.rate_tat AS new_tool_tat
    FROM checks LEFT JOIN log ON true LEFT JOIN adm ON true
    LEFT JOIN key_rate ON true LEFT JOIN tool_rate ON true
    """
)

# A claim of an Idempotency-Key, arbitrated by its unique index (user, key): the loser of a race
# waits for the winner's transaction and then claims nothing. An expired record not yet swept is
# taken over.
_CLAIM_KEY = text(
    """
    INSERT INTO idempotency_keys AS k
        (id, user_id, key, request_hash, tool_id, state, created_at, expires_at)
    VALUES (:id, :user_id, :key, :request_hash, :tool_id, 'in_flight', :now, :expires_at)
    ON CONFLICT (user_id, key) DO UPDATE SET
        request_hash = EXCLUDED.request_hash, tool_id = EXCLUDED.tool_id, usage_log_id = NULL,
        state = 'in_flight', response_status = NULL, response_body = NULL,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= EXCLUDED.created_at
    RETURNING k.id
    """
)

_LOOKUP_KEY = text(
    """
    SELECT state, request_hash, response_status, response_body::text AS body
    FROM idempotency_keys WHERE user_id = :user_id AND key = :key AND expires_at > :now
    """
)

_LINK_KEY = text("UPDATE idempotency_keys SET usage_log_id = :log_id WHERE id = :idem_id")

# Settle in one statement: `l` locks the pending log (a log the sweep closed meanwhile is no
# longer pending, so nothing below happens and the statement returns no row); `sub` charges the
# tokens and releases the reservation; `stamp` is the settle time clamped into the period the
# tokens were charged to; `log` writes the outcome; `idem` stores the response for replay;
# `settled` feeds the rollup upserts (`rollups.ROLLUP_CTES`).
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
        RETURNING s.tokens_used, s.current_period_start, s.current_period_end,
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
            "timestamp" = stamp.ts, error_code = :error_code, token_source = :token_source
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
               CAST(:cancelled AS integer) AS cancelled, CAST(:tokens AS bigint) AS tokens
        FROM log
    ), """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + rollups.ROLLUP_CTES
    + """
    SELECT log.id, sub.tokens_used, sub.current_period_end, sub.token_limit
    FROM log LEFT JOIN sub ON true
    """
)

# How a call that a settle found no longer pending was closed (see `MeteringStore.settle`).
_OUTCOME = text(
    """
    SELECT u.status, u.error_code, s.tokens_used, s.current_period_end,
           (SELECT p.token_limit FROM plans AS p WHERE p.code = s.plan_code) AS token_limit
    FROM usage_logs AS u LEFT JOIN subscriptions AS s ON s.id = u.subscription_id
    WHERE u.id = :log_id
    """
)


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


# Undo admissions whose reply was lost (their connection failed under the statement): their
# pending logs go, with their reservations. A no-op for a statement that never ran. Nothing else
# refers to such a log — no call was made for it, and without an Idempotency-Key no key names it.
_UNDO_ADMISSIONS = text(
    """
    WITH l AS (
        DELETE FROM usage_logs WHERE id = ANY(CAST(:log_ids AS uuid[])) AND status = 'pending'
        RETURNING subscription_id, tokens_reserved
    )"""  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + _release_reservations("l")
)

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
                    secs => t.timeout_seconds * t.max_attempts + 5 * t.max_attempts + :slack
                            + CASE WHEN t.streaming THEN :stream_max ELSE 0 END)
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

_DELETE_EXPIRED_KEYS = text(
    """
    DELETE FROM idempotency_keys WHERE id IN (
        SELECT id FROM idempotency_keys WHERE expires_at <= :now
        ORDER BY expires_at LIMIT 10000 FOR UPDATE SKIP LOCKED)
    """
)


# ---------------------------------------------------------------------------------------------
# Mapping rows to results, in one place
# ---------------------------------------------------------------------------------------------


def _admission_read(row: Record) -> AdmissionRead:
    tool = None
    if row["tool_id"] is not None:
        secret = (row["auth_header_name"], row["auth_header_value"])
        tool = ToolRead(
            id=row["tool_id"],
            api_endpoint=row["api_endpoint"],
            timeout_seconds=row["timeout_seconds"],
            max_attempts=row["max_attempts"],
            secret_header=secret if secret[0] and secret[1] else None,
            updated_at=row["tool_updated_at"],
            changed=row["tool_changed"],
            schema_text=row["schema_text"],
            min_rank=row["min_rank"],
            streaming=row["streaming"],
        )
    account = None
    if row["sub_id"] is not None:
        account = AccountRead(
            subscription_id=row["sub_id"],
            status=row["sub_status"],
            plan_code=row["plan_code"],
            plan_rank=row["plan_rank"],
            token_limit=row["token_limit"],
            tokens_used=row["tokens_used"],
            tokens_reserved=row["tokens_reserved"],
            current_period_end=row["current_period_end"],
            expires_at=row["expires_at"],
        )
    stored = None
    if row["idem_state"] is not None:
        stored = StoredKey(row["idem_state"], bytes(row["idem_hash"]), row["idem_status"], row["idem_body"])
    return AdmissionRead(
        user_id=row["user_id"], tool=tool, account=account, stored=stored, limits=_limits(row)
    )


# the per-minute limits, in the contract's order, and their columns' prefix in `_ADMIT`'s answer
_BUCKETS: tuple[tuple[Scope, str], ...] = (("plan", "plan"), ("api_key", "key"), ("tool", "tool"))


def _limits(row: Record) -> Limits:
    """The limits that apply to the call, in the contract's order (`rate_limits.py`)."""
    buckets = [
        Bucket(scope, row[f"{p}_rpm"], row[f"{p}_tat"], row[f"{p}_rate_ok"], row[f"new_{p}_tat"])
        for scope, p in _BUCKETS
        if row[f"{p}_rpm"] is not None
    ]
    concurrency = None
    if row["max_concurrent"] is not None:
        concurrency = Concurrency(row["max_concurrent"], row["inflight"], row["concurrency_ok"])
    return Limits(tuple(buckets), concurrency)


def _admit_result(row: Record, req: AdmitRequest) -> AdmitResult:
    read = _admission_read(row)
    if row["admitted_plan"] is None:
        return AdmitResult(read, None)
    assert read.user_id is not None and read.tool is not None and read.account is not None
    admission = Admission(
        log_id=req.log_id,
        user_id=read.user_id,
        subscription_id=read.account.subscription_id,
        plan_code=row["admitted_plan"],
        tool=read.tool,
        quota=read.account.quota,
        started_at=req.now,
        tokens_left=read.account.token_limit - read.account.tokens_used - read.account.tokens_reserved,
        limits=read.limits,
    )
    return AdmitResult(read, admission)


def _settle_params(req: SettleRequest) -> dict[str, Any]:
    admission = req.admission
    return {
        "log_id": admission.log_id,
        "idem_id": admission.idem_id,
        "shard": rollups.platform_shard(admission.user_id),
        "status": req.status,
        "tokens": req.tokens,
        "duration_ms": req.duration_ms,
        "now": req.now,
        "error_code": req.error_code,
        "response_status": req.response_status,
        "response_body": (
            encode_response(req.response_body, req.media_type) if admission.idem_id is not None else None
        ),
        "success": int(req.status == "success"),
        "error": int(req.status == "error"),
        "timeout": int(req.status == "timeout"),
        "cancelled": int(req.status == "cancelled"),
        "token_source": req.token_source,
    }


def _quota_of(row: Mapping[Any, Any]) -> Quota | None:
    if row["tokens_used"] is None or row["token_limit"] is None:
        return None
    return Quota(row["token_limit"], row["tokens_used"], row["current_period_end"])


# ---------------------------------------------------------------------------------------------
# Failures: which ones a caller may retry
# ---------------------------------------------------------------------------------------------


def connection_lost(exc: BaseException) -> bool:
    """The connection failed under the statement (not a pool that ran dry: waiting again for a
    connection to undo and retry would only wait longer)."""
    return is_db_unavailable(exc) and not isinstance(exc, PoolTimeout)


def log_id_taken(exc: BaseException) -> bool:
    """The admission failed on the usage log's primary key: its id was already taken."""
    return isinstance(exc, asyncpg.exceptions.UniqueViolationError) and exc.constraint_name == "pk_usage_logs"


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the database unreachable or restarting, the pool exhausted, a
    deadlock or serialization failure — whether SQLAlchemy wrapped it or asyncpg raised it."""
    return (
        isinstance(exc, PoolTimeout) or is_db_unavailable(exc) or bool(sqlstates(exc) & _RETRYABLE_SQLSTATES)
    )


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class MeteringConnection:
    """One pooled connection's worth of admission statements: the admission itself and, with an
    Idempotency-Key, the key's claim — in one transaction when the caller opens one."""

    def __init__(self, session: DriverSession) -> None:
        self._session = session

    def transaction(self) -> Any:
        """`async with conn.transaction():` — the statements inside commit together or not at all."""
        return self._session.driver.transaction()

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        now = req.now
        params = {
            **req.credential.params(now),
            "tool_id": req.tool_id,
            "idempotency_key": req.idempotency_key,
            "reserve": req.reserve,
            "log_id": req.log_id,
            "request_id": req.request_id,
            "tool_version": req.tool_version,
            "go": req.go,
            "touch_before": now - API_KEY_TOUCH_INTERVAL,
        }
        row = await self._session.fetchrow(_ADMIT, params)
        assert row is not None  # `ctx` always has its one row
        return _admit_result(row, req)

    async def claim_key(
        self, *, user_id: uuid.UUID, key: str, digest: bytes, tool_id: uuid.UUID, now: datetime
    ) -> uuid.UUID | None:
        """Claim `key` for this request; None when someone holds it (live, unexpired)."""
        row = await self._session.fetchrow(
            _CLAIM_KEY,
            {
                "id": uuid.uuid4(),
                "user_id": user_id,
                "key": key,
                "request_hash": digest,
                "tool_id": tool_id,
                "now": now,
                "expires_at": now + KEY_TTL,
            },
        )
        return None if row is None else uuid.UUID(str(row["id"]))

    async def lookup_key(self, *, user_id: uuid.UUID, key: str, now: datetime) -> StoredKey | None:
        row = await self._session.fetchrow(_LOOKUP_KEY, {"user_id": user_id, "key": key, "now": now})
        if row is None:
            return None
        return StoredKey(row["state"], bytes(row["request_hash"]), row["response_status"], row["body"])

    async def link_key(self, idem_id: uuid.UUID, log_id: uuid.UUID) -> None:
        await self._session.execute(_LINK_KEY, {"idem_id": idem_id, "log_id": log_id})


class MeteringStore:
    """Every metering statement, on one engine; built once per process (the gateway's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @asynccontextmanager
    async def connection(self, *, ping: bool) -> AsyncIterator[MeteringConnection]:
        """A pooled connection for the admission. Without `ping` a connection used within the
        last second comes without the pre-ping round trip (`db.connect_retried`): the caller must
        then be ready to admit again when it turns out dead (`admit.AdmissionRun._recover`)."""
        async with self.engine.connect() if ping else connect_retried(self.engine) as conn:
            try:
                yield MeteringConnection(DriverSession(await driver_of(conn)))
            except Exception as exc:
                if connection_lost(exc):
                    # asyncpg raised it, not SQLAlchemy: tell the pool this connection is done
                    await conn.invalidate()
                raise

    async def undo_admissions(self, log_ids: list[uuid.UUID]) -> None:
        """Take back admissions made without an Idempotency-Key whose outcome is unknown."""
        if log_ids:
            async with self.engine.begin() as conn:
                await conn.execute(_UNDO_ADMISSIONS, {"log_ids": log_ids})

    async def settle(self, req: SettleRequest) -> Settlement:
        """`settle_once`, retried a few times on transient database errors.

        A blip must not turn a completed call into one the sweep closes as abandoned. Retrying is
        safe: a first attempt that committed without us hearing back leaves nothing `pending`, so
        the retry settles nothing twice — and `_settled_before` then tells that case (charged, by
        the attempt whose reply was lost) from a call the sweep closed meanwhile (not charged).
        """
        retried = False
        for delay in SETTLE_RETRY_DELAYS:
            try:
                result = await self.settle_once(req)
                break
            except Exception as exc:
                if not transient(exc):
                    raise
                log.warning(
                    "settle failed; retrying",
                    extra={"invocation_id": str(req.admission.log_id), "error": type(exc).__name__},
                )
                retried = True
                await asyncio.sleep(delay)
        else:
            result = await self.settle_once(req)
        if result.settled:
            return result
        return await self._settled_before(req, retried=retried)

    async def settle_once(self, req: SettleRequest) -> Settlement:
        """Write the outcome, charge, release, store the idempotent response, bump the rollups:
        one statement, outside any explicit transaction (a single statement is atomic on its own
        and needs no BEGIN/COMMIT round trips)."""
        async with connect_retried(self.engine) as conn:  # `settle` retries a dead connection
            try:
                row = await DriverSession(await driver_of(conn)).fetchrow(_SETTLE, _settle_params(req))
            except Exception as exc:
                if connection_lost(exc):
                    await conn.invalidate()  # asyncpg raised it, not SQLAlchemy: the pool must know
                raise
        if row is None:  # nothing pending: see `settle`
            return Settlement(False)
        return Settlement(True, _quota_of(row))

    async def _settled_before(self, req: SettleRequest, *, retried: bool) -> Settlement:
        """Why a settle found nothing pending: the sweep closed the call (not charged), or an
        earlier attempt of this very settle committed and only its reply was lost (charged)."""
        log_id = req.admission.log_id
        context = {"invocation_id": str(log_id), "outcome": req.status}
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(_OUTCOME, {"log_id": log_id})).mappings().first()
        except Exception as exc:  # only to say which it was: the call's outcome is settled either way
            log.warning(
                "could not tell how a settled call was settled",
                extra={**context, "error": type(exc).__name__},
            )
            return Settlement(False)
        if row is not None and retried and row["error_code"] != ABANDONED:
            log.info("settled by an earlier attempt whose reply was lost", extra=context)
            return Settlement(True, _quota_of(row))
        if row is not None and row["error_code"] == ABANDONED:
            log.warning("invocation was already closed by the sweep; not charged", extra=context)
        else:
            log.warning("invocation was already settled; not charged again", extra=context)
        return Settlement(False)

    # -- sweep jobs (`tools/sweeps.py`): they run in the sweep's own session -------------------

    @staticmethod
    async def close_stale(session: AsyncSession, settings: Settings, now: datetime) -> int:
        """Close invocations whose worker died before settling them (guarantee 2)."""
        cutoff = now - timedelta(seconds=settings.stale_invocation_seconds)
        rows = (
            await session.execute(
                _CLOSE_STALE,
                {
                    "now": now,
                    "cutoff": cutoff,
                    "slack": STALE_SLACK_SECONDS,
                    "stream_max": settings.tool_stream_max_seconds,
                    "abandoned": ABANDONED,
                },
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

    @staticmethod
    async def forget_expired_keys(session: AsyncSession, settings: Settings, now: datetime) -> int:
        """Forget Idempotency-Keys older than 24 h (in batches, safe on many workers at once)."""
        result: Any = await session.execute(_DELETE_EXPIRED_KEYS, {"now": now})
        return int(result.rowcount or 0)

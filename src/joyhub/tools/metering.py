"""The metering store: every statement of the invocation ledger, its rollups and its idempotency
records (API.md §5, guarantees 1 to 4), behind typed methods that return frozen dataclasses.

The ledger is keyed by the **subscription** — the billing account — not by the user: the
admission reads "the account this caller bills" in one place (the `account` CTE), and every
write after it (reservation, charge, release, the sweep) goes through the subscription id the
admission recorded on the usage log. Who may bill a subscription is therefore a question of that
one CTE, not of the ledger.

- **admit** is one conditional statement (`_admit_sql`), one round trip: it checks the caller's
  credential by the one rule (`auth/credentials.py`), reads the tool, the account and its plan,
  the tool's minimum plan and any live idempotency record, and — only when every check passes —
  reserves the call's estimated tokens (`tokens_reserved`, `inflight`) with a conditional update
  and writes the `pending` usage log: both or neither. Tokens of calls still in flight count, so
  concurrent calls at the quota edge cannot all pass; the overshoot is bounded by the calls
  already in flight. The row lock of the conditional update makes concurrent admissions of one
  account wait and re-check the fresh row.
- **settle** is one statement (`_settle_sql`, so one implicit transaction and one round trip): the
  usage log gets its outcome (guarded by `status = 'pending'`, so a call is never settled twice),
  the account is charged and its reservation released, the idempotency record stores the
  response, and the rollups are bumped (`usage/rollups.py`). The log's `timestamp` is the settle
  time clamped into the period the tokens were charged to, so `tokens_used` always equals the sum
  of the current period's logs.
- **the sweep** closes a call whose worker died (`ABANDONED`, 0 tokens) once it is older than
  both STALE_INVOCATION_SECONDS and its tool's worst case (a stream's included: any tool that
  streams, and every OpenAI-compatible one, API.md §12), releasing what it held; and forgets
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
from functools import lru_cache
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql.elements import TextClause

from joyhub.auth.credentials import API_KEY_TOUCH_INTERVAL, Credential, credential_users
from joyhub.core.batch_sql import COUNT, MAX, SUM, Total, after, in_key_order, per_key
from joyhub.core.clock import iso_utc
from joyhub.core.config import Settings
from joyhub.core.db import Releases, checkout
from joyhub.core.errors import is_db_unavailable, sqlstates
from joyhub.tools.driver import DriverSession, Record, driver_of
from joyhub.tools.group_commit import GroupCommit
from joyhub.tools.idempotency import KEY_TTL, StoredKey, encode_response
from joyhub.tools.rate_limits import NO_LIMITS, Bucket, Concurrency, Limits, Scope
from joyhub.usage import rollups
from joyhub.usage.partitions import SETTLE_WINDOW
from joyhub.webhooks import quota_alerts

log = logging.getLogger("joyhub.tools.metering")

STALE_SLACK_SECONDS = 60
ABANDONED = "ABANDONED"  # the error code of a call the sweep closed
SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0)
SETTLE_LINES = 2  # settle statements a process keeps under way at once (`MeteringStore.settle`)
ADMIT_LINES = 2  # admission statements a process keeps under way at once per tool (`AdmitRequest.batch_key`)
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
    protocol: str = "json"  # how the upstream is spoken to: json (API.md §5) | openai (§12)
    name: str = ""  # the tool's name: an openai tool's model id on the hub's side
    upstream_model: str | None = None  # an openai tool's model id upstream (None: its name)


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
class MemberRead:
    """An organization call's member and their own token limit for the period (API.md §13)."""

    token_limit: int | None  # None: no limit of their own
    tokens_used: int  # this period, within the organization
    tokens_reserved: int  # held by their calls in flight (and those ahead in the batch)

    @property
    def tokens_left(self) -> bool:
        return self.token_limit is None or self.tokens_used + self.tokens_reserved < self.token_limit


@dataclass(frozen=True)
class AdmissionRead:
    """Everything the admission statement read, admitted or not."""

    user_id: uuid.UUID | None  # None: the credential no longer holds
    tool: ToolRead | None  # None: no such live, active tool
    account: AccountRead | None  # None: the caller never subscribed
    stored: StoredKey | None  # a live record of the request's Idempotency-Key
    limits: Limits = NO_LIMITS  # the rate and concurrency limits, as decided on the locked rows
    org_id: uuid.UUID | None = None  # the organization the call bills (None: personal)
    # an organization was asked for (`X-Org-ID`) that the caller is not a member of: 404
    org_denied: bool = False
    member: MemberRead | None = None  # the member's own limit, for an organization call


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
    org_id: uuid.UUID | None = None  # the organization the call bills (API.md §13)


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

    @property
    def batch_key(self) -> tuple[uuid.UUID, datetime | None, int]:
        """Calls that may be admitted by one statement: one tool, one version, whoever calls —
        on one of `ADMIT_LINES` lines, by caller (by organization for `X-Org-ID`), so that the
        calls of one caller or one organization share a line, and a batch waiting on one hot
        account's row lock does not hold up every other caller."""
        return (
            self.tool_id,
            self.tool_version,
            hash(self.credential.org_id or self.credential) % ADMIT_LINES,
        )


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
    input_tokens: int | None = None  # the upstream's reported prompt tokens (API.md §12)
    output_tokens: int | None = None  # and completion tokens


@dataclass(frozen=True)
class Settlement:
    settled: bool  # False when the sweep had already closed this call
    quota: Quota | None = None  # the account after the charge


# ---------------------------------------------------------------------------------------------
# The statements
# ---------------------------------------------------------------------------------------------

# The authentication, the read, the limits and the admission of one call — or of a batch of
# calls to one tool, of any number of callers (group commit, `group_commit.py`) — in one statement:
# - `req` is the batch, in arrival order: each call's usage log id, reservation, request id,
#   whether its Python checks passed (`go`: input valid for this tool version, circuit closed),
#   and its caller `g`, an index into `grp`, the batch's distinct credentials;
# - `who` is the one credential rule (`auth/credentials.py`), applied to each credential;
# - `lk_key`, `account`, `lk_member` and `lk_tool` lock what the calls may change, each kind in id
#   order and the kinds in that order (each waits for the one before through its sub-select, so
#   every admission locks keys → accounts → members → tool and two admissions cannot deadlock;
#   the tool, shared by every caller, is held for the shortest time): the callers' API keys that
#   have their own rate limit, the subscriptions they bill (their own, or their organization's),
#   their rows as organization members, and the tool when it has a limit. Locked rows are read as
#   they are *now*, after any concurrent admission that held them, so every check sees exact
#   numbers — the quota, the calls running, each member's tokens and each limit's GCRA state;
# - `touch` records an unlimited API key's use at most once a minute, best effort: SKIP LOCKED, so
#   it never waits (a limited key is stamped by `key_rate`: one statement must not update a row
#   twice);
# - `tool` reads the tool and its minimum plan; `ctx` reads, per caller, the account and its plan,
#   the member, the key and any live idempotency record (and the tool's input schema when the
#   caller validated against another version, `tool_versions.py`);
# - `room` is what each caller's account and limits have room for now: calls under each per-minute
#   limit (GCRA: a limit of L admits a call when max(tat, now) + 60/L s is at most 60 s ahead of
#   now, and moves tat there — a burst of L at once, then one every 60/L s, evenly; with a
#   tolerance of half an interval, at most 0.1 s, so that calls whose `now`s reach the lock out of
#   order, and microsecond rounding, never cost a burst its last call), calls running, and tokens;
# - `by_key` … `decided` line the batch up, finest level first: a call passes a level when that
#   level's checks pass with the calls ahead of it that passed the finer levels counted (per key:
#   its rate; per member: their tokens; per account: the plan's rate, the calls running, the
#   tokens; then the tool's rate over every call). A key belongs to one member and one account, a
#   member to one account, so at every level the calls that pass are the longest run that fits —
#   the admitted calls are exactly those that would have been admitted had they come one by one;
# - `judged` says, for every call, each check as it stood with only the calls *admitted* ahead of
#   it counted, so a refusal says what it would have said had the calls come one by one;
# - `adm` reserves the admitted calls' tokens on each account, counts them in flight and advances
#   the plan's GCRA; `member_adm`, `key_rate` and `tool_rate` do the members', keys' and tool's;
# - `limited` / `limited_org` / `limited_platform` count the calls refused by a rate or
#   concurrency limit in the day's rollups (a counter, not a row per refusal): a personal call's in
#   the caller's `usage_daily`, an organization call's in the organization's `usage_org_daily`
#   (by member and tool), every call's in the platform's — each in key order, as the settle's
#   rollups (`usage/rollups.py`): the platform's rows are shared by every account, and two
#   statements upserting them in different orders deadlock (seen under a storm of refusals);
# - `log` writes each admitted call's pending usage log.
# The `{…}` parts are filled in for the batch's shape (`AdmitShape`, `_admit_sql` below).
_ADMIT_TEMPLATE = """
    WITH req AS (
        SELECT r.n, r.g, r.log_id, r.reserve, r.request_id, r.go, r.started_at
        FROM unnest(CAST(:log_ids AS uuid[]), CAST(:callers AS integer[]), CAST(:reserves AS bigint[]),
                    CAST(:request_ids AS varchar[]), CAST(:gos AS boolean[]),
                    CAST(:started_ats AS timestamptz[]))
             WITH ORDINALITY AS r(log_id, g, reserve, request_id, go, started_at, n)
    ), grp AS (
        SELECT c.g, c.session_id, c.user_id, c.key_digest, c.org_id
        FROM unnest(CAST(:cred_session_ids AS uuid[]), CAST(:cred_user_ids AS uuid[]),
                    CAST(:cred_key_digests AS bytea[]), CAST(:cred_org_ids AS uuid[]))
             WITH ORDINALITY AS c(session_id, user_id, key_digest, org_id, g)
    ), who AS (
        SELECT grp.g, w.user_id, w.api_key_id, w.org_id
        FROM grp CROSS JOIN LATERAL ({who}) AS w
    ), lk_key AS ({lk_key}
    ), member AS ({member}
    ), account AS (
        SELECT s.* FROM subscriptions AS s
        WHERE (s.user_id = ANY(ARRAY(SELECT who.user_id FROM who WHERE who.org_id IS NULL))
               OR s.org_id = ANY(ARRAY(SELECT member.org_id FROM member)))
          AND {after_keys}
        ORDER BY s.id
        FOR NO KEY UPDATE OF s
    ), lk_member AS ({lk_member}
    ), lk_tool AS (
        SELECT t.id, t.requests_per_minute AS rpm, t.rate_tat
        FROM tools AS t
        WHERE t.id = :tool_id AND t.requests_per_minute IS NOT NULL AND t.deleted_at IS NULL AND t.is_active
          AND {after_members}
        FOR NO KEY UPDATE OF t
    ){touch}, tool AS (
        SELECT t.id AS tool_id, t.api_endpoint, t.timeout_seconds, t.max_attempts,
               t.auth_header_name, t.auth_header_value, t.updated_at AS tool_updated_at, t.streaming,
               t.protocol, t.upstream_model, t.name AS tool_name,
               t.updated_at IS DISTINCT FROM :tool_version AS tool_changed,
               CASE WHEN t.updated_at IS DISTINCT FROM :tool_version THEN t.input_schema::text END
                   AS schema_text,
               mp.rank AS min_rank, lk_tool.rpm AS tool_rpm, lk_tool.rate_tat AS tool_tat
        FROM (SELECT 1) AS one
        LEFT JOIN tools AS t ON t.id = :tool_id AND t.deleted_at IS NULL AND t.is_active
        LEFT JOIN plans AS mp ON mp.code = t.min_plan_code
        LEFT JOIN lk_tool ON true
    ), ctx AS (
        SELECT grp.g, who.user_id, who.api_key_id, who.org_id AS asked_org_id, member.org_id,
               lm.token_limit AS member_limit,
               CASE WHEN lm.period_end = s.current_period_end THEN lm.tokens_used ELSE 0 END AS member_used,
               lm.tokens_reserved AS member_reserved,
               tool.*,
               s.id AS sub_id, s.status AS sub_status, s.plan_code, s.tokens_used, s.tokens_reserved,
               s.current_period_end, s.expires_at, s.inflight, s.rate_tat AS plan_tat,
               p.token_limit, p.rank AS plan_rank, p.requests_per_minute AS plan_rpm, p.max_concurrent,
               lk_key.rpm AS key_rpm, lk_key.rate_tat AS key_tat,
               {idem_columns}
        FROM grp
        CROSS JOIN tool
        LEFT JOIN who ON who.g = grp.g
        LEFT JOIN member ON member.g = grp.g
        LEFT JOIN lk_member AS lm ON lm.org_id = member.org_id AND lm.user_id = member.user_id
        LEFT JOIN account AS s
               ON CASE WHEN who.org_id IS NULL THEN s.user_id = who.user_id ELSE s.org_id = member.org_id END
        LEFT JOIN plans AS p ON p.code = s.plan_code
        LEFT JOIN lk_key ON lk_key.id = who.api_key_id{idem_join}
    ), room AS (
        SELECT ctx.*,
               ctx.user_id IS NOT NULL AND ctx.tool_id IS NOT NULL AND ctx.idem_state IS NULL
                 AND ctx.sub_status = 'active' AND ctx.current_period_end > :now
                 AND (ctx.expires_at IS NULL OR ctx.expires_at > :now)
                 AND (ctx.min_rank IS NULL OR ctx.plan_rank >= ctx.min_rank)
                 AND ctx.tool_updated_at = :tool_version AS passes_gate,
               floor((60 + LEAST(30.0 / ctx.plan_rpm, 0.1)
                      - EXTRACT(EPOCH FROM GREATEST(ctx.plan_tat, :now) - :now)) * ctx.plan_rpm / 60)
                   AS plan_room,
               floor((60 + LEAST(30.0 / ctx.key_rpm, 0.1)
                      - EXTRACT(EPOCH FROM GREATEST(ctx.key_tat, :now) - :now)) * ctx.key_rpm / 60)
                   AS key_room,
               floor((60 + LEAST(30.0 / ctx.tool_rpm, 0.1)
                      - EXTRACT(EPOCH FROM GREATEST(ctx.tool_tat, :now) - :now)) * ctx.tool_rpm / 60)
                   AS tool_room,
               ctx.token_limit - ctx.tokens_used - ctx.tokens_reserved AS token_room,
               ctx.member_limit - ctx.member_used - ctx.member_reserved AS member_room
        FROM ctx
    ), calls AS (
        SELECT req.n, req.g, req.log_id, req.reserve, req.request_id, req.started_at,
               COALESCE(room.passes_gate AND req.go, false) AS eligible, room.passes_gate,
               room.user_id, room.org_id, room.api_key_id, room.sub_id, room.plan_code, room.plan_rpm,
               room.key_room, room.member_room, room.plan_room, room.max_concurrent, room.inflight,
               room.token_room, room.tool_room
        FROM req JOIN room ON room.g = req.g
    ), by_key AS (
        SELECT c.*,
               c.eligible AND (c.key_room IS NULL OR {eligible_ahead_of_key} < c.key_room) AS key_ok
        FROM calls AS c
    ), by_member AS (
        SELECT c.*,
               c.key_ok AND (c.member_room IS NULL OR {key_ok_tokens_ahead_of_member} < c.member_room)
                   AS member_ok
        FROM by_key AS c
    ), by_account AS (
        SELECT c.*,
               c.member_ok
                 AND (c.plan_room IS NULL OR {member_ok_ahead} < c.plan_room)
                 AND (c.max_concurrent IS NULL OR c.inflight + {member_ok_ahead} < c.max_concurrent)
                 AND {member_ok_tokens_ahead} < c.token_room
                   AS account_ok
        FROM by_member AS c
    ), decided AS (
        SELECT c.*,
               COALESCE(c.account_ok AND (c.tool_room IS NULL OR {account_ok_ahead_of_tool} < c.tool_room),
                        false) AS admitted
        FROM by_account AS c
    ), judged AS (
        -- each call judged against what was admitted ahead of it (per key, member, account, tool)
        SELECT c.n, c.g, c.log_id, c.passes_gate, c.user_id, c.org_id, c.plan_code,
               c.ahead, c.key_ahead, c.tool_ahead, c.ahead_tokens, c.member_ahead_tokens,
               c.plan_room IS NULL OR c.ahead < c.plan_room AS plan_rate_ok,
               c.key_room IS NULL OR c.key_ahead < c.key_room AS key_rate_ok,
               c.tool_room IS NULL OR c.tool_ahead < c.tool_room AS tool_rate_ok,
               c.max_concurrent IS NULL OR c.inflight + c.ahead < c.max_concurrent AS concurrency_ok
        FROM (
            SELECT d.*, {admitted_ahead} AS ahead, {admitted_tokens_ahead} AS ahead_tokens,
                   {admitted_ahead_of_key} AS key_ahead,
                   {admitted_tokens_ahead_of_member} AS member_ahead_tokens,
                   {admitted_ahead_of_tool} AS tool_ahead
            FROM decided AS d
        ) AS c
    ), adm AS (
        UPDATE subscriptions AS s
        SET tokens_reserved = s.tokens_reserved + a.reserve, inflight = s.inflight + a.calls,
            rate_tat = CASE WHEN a.plan_rpm IS NULL THEN s.rate_tat
                            ELSE GREATEST(s.rate_tat, :now)
                                 + make_interval(secs => a.calls * 60.0 / a.plan_rpm) END
        FROM ({admitted_per_account}) AS a
        WHERE s.id = a.sub_id
        RETURNING s.id, s.plan_code
    ){member_adm}{key_rate}, tool_rate AS (
        UPDATE tools AS t
        SET rate_tat = GREATEST(t.rate_tat, :now)
                       + make_interval(secs => a.calls * 60.0 / t.requests_per_minute)
        FROM ({admitted_calls}) AS a, lk_tool
        WHERE t.id = lk_tool.id AND a.calls > 0
    ), refused AS ({refused}
    ), limited AS (
        INSERT INTO usage_daily AS d
            (user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, tokens, rate_limited)
        SELECT user_id, CAST(:now AS timestamptz) AT TIME ZONE 'UTC', tool_id, plan_code, 0, 0, 0, 0, 0, calls
        FROM refused WHERE org_id IS NULL{in_key_order}
        ON CONFLICT (user_id, day, tool_id, plan_code)
            DO UPDATE SET rate_limited = d.rate_limited + EXCLUDED.rate_limited
    ){limited_org}, limited_platform AS (
        INSERT INTO usage_platform_daily AS pd
            (day, tool_id, plan_code, shard, invocations, successes, errors, timeouts, tokens, rate_limited)
        SELECT day, tool_id, plan_code, shard, 0, 0, 0, 0, 0, calls
        FROM ({refused_per_platform_row}) AS r(day, tool_id, plan_code, shard, calls)
        ON CONFLICT (day, tool_id, plan_code, shard)
            DO UPDATE SET rate_limited = pd.rate_limited + EXCLUDED.rate_limited
    ), log AS (
        INSERT INTO usage_logs (id, user_id, tool_id, subscription_id, plan_code, status,
                                started_at, "timestamp", tokens_used, tokens_reserved, request_id, org_id)
        SELECT d.log_id, d.user_id, CAST(:tool_id AS uuid), adm.id, adm.plan_code,
               'pending', d.started_at, :now, 0, d.reserve, d.request_id, d.org_id
        FROM decided AS d JOIN adm ON adm.id = d.sub_id
        WHERE d.admitted
        RETURNING id
    )
    SELECT room.*, j.n, j.ahead, j.key_ahead, j.tool_ahead, j.ahead_tokens, j.member_ahead_tokens,
           j.plan_rate_ok, j.key_rate_ok, j.tool_rate_ok, j.concurrency_ok, log.id IS NOT NULL AS admitted
    FROM judged AS j JOIN room ON room.g = j.g LEFT JOIN log ON log.id = j.log_id
    ORDER BY j.n
    """

# The parts of `_ADMIT_TEMPLATE` that only some batches need (`AdmitShape`), and what stands in for
# them when a batch cannot reach them: an empty relation of the same columns, or nothing at all.
_LOCK_KEYS = """
        SELECT k.id, k.requests_per_minute AS rpm, k.rate_tat
        FROM api_keys AS k
        WHERE k.id IN (SELECT who.api_key_id FROM who) AND k.requests_per_minute IS NOT NULL
        ORDER BY k.id
        FOR NO KEY UPDATE OF k"""
_NO_KEYS = """
        SELECT CAST(NULL AS uuid) AS id, CAST(NULL AS integer) AS rpm, CAST(NULL AS timestamptz) AS rate_tat
        WHERE false"""
_MEMBERS = """
        SELECT who.g, m.org_id, m.user_id
        FROM who JOIN organization_members AS m ON m.user_id = who.user_id AND m.org_id = who.org_id
        JOIN organizations AS o ON o.id = m.org_id AND o.deleted_at IS NULL"""
_NO_MEMBERS = """
        SELECT CAST(NULL AS bigint) AS g, CAST(NULL AS uuid) AS org_id, CAST(NULL AS uuid) AS user_id
        WHERE false"""
_LOCK_MEMBERS = f"""
        SELECT m.org_id, m.user_id, m.token_limit, m.tokens_used, m.tokens_reserved, m.period_end
        FROM organization_members AS m
        WHERE (m.org_id, m.user_id) IN (SELECT member.org_id, member.user_id FROM member)
          AND {after("account")}
        ORDER BY m.org_id, m.user_id
        FOR NO KEY UPDATE OF m"""  # noqa: S608 (constant SQL of ours)
# no member to lock, but read after the accounts all the same: the tool's lock waits for this one
_NO_MEMBERS_LOCKED = f"""
        SELECT CAST(NULL AS uuid) AS org_id, CAST(NULL AS uuid) AS user_id,
               CAST(NULL AS bigint) AS token_limit, CAST(NULL AS bigint) AS tokens_used,
               CAST(NULL AS bigint) AS tokens_reserved, CAST(NULL AS timestamptz) AS period_end
        WHERE NOT ({after("account")})"""
_TOUCH_KEYS = """, touch AS (
        UPDATE api_keys AS k SET last_used_at = :now
        WHERE k.id IN (
            SELECT tk.id FROM api_keys AS tk
            WHERE tk.id IN (SELECT who.api_key_id FROM who)
              AND (tk.last_used_at IS NULL OR tk.last_used_at < :touch_before)
              AND tk.requests_per_minute IS NULL
            ORDER BY tk.id
            FOR NO KEY UPDATE OF tk SKIP LOCKED)
    )"""
_IDEM_COLUMNS = """kk.state AS idem_state, kk.request_hash AS idem_hash,
               kk.response_status AS idem_status, kk.response_body::text AS idem_body"""
_NO_IDEM_COLUMNS = """CAST(NULL AS varchar) AS idem_state, CAST(NULL AS bytea) AS idem_hash,
               CAST(NULL AS integer) AS idem_status, CAST(NULL AS text) AS idem_body"""
_IDEM_JOIN = """
        LEFT JOIN idempotency_keys AS kk
               ON kk.user_id = who.user_id AND kk.key = :idempotency_key AND kk.expires_at > :now"""
_MEMBERS_RESERVE = """, member_adm AS (
        -- the members' shares of their organizations' reservations, under the locks taken above
        UPDATE organization_members AS m SET tokens_reserved = m.tokens_reserved + a.reserve
        FROM (SELECT org_id, user_id, sum(reserve) AS reserve
              FROM decided WHERE admitted AND org_id IS NOT NULL GROUP BY org_id, user_id) AS a
        WHERE m.org_id = a.org_id AND m.user_id = a.user_id
    )"""
_KEYS_RATE = """, key_rate AS (
        UPDATE api_keys AS k
        SET rate_tat = GREATEST(k.rate_tat, :now)
                       + make_interval(secs => a.calls * 60.0 / k.requests_per_minute),
            last_used_at = :now
        FROM (SELECT api_key_id, count(*) AS calls FROM decided WHERE admitted GROUP BY api_key_id) AS a
        JOIN lk_key ON lk_key.id = a.api_key_id
        WHERE k.id = a.api_key_id
    )"""
_MEMBERS_LIMITED = """, limited_org AS (
        INSERT INTO usage_org_daily AS od
            (org_id, day, user_id, tool_id, invocations, successes, errors, timeouts, cancelled, tokens,
             rate_limited)
        SELECT org_id, CAST(:now AS timestamptz) AT TIME ZONE 'UTC', user_id, tool_id, 0, 0, 0, 0, 0, 0, calls
        FROM refused WHERE org_id IS NOT NULL{in_key_order}
        ON CONFLICT (org_id, day, user_id, tool_id)
            DO UPDATE SET rate_limited = od.rate_limited + EXCLUDED.rate_limited
    )"""


# What is ahead of a call at each level of `by_key` … `judged`: among the calls of the batch before
# it (in arrival order) in the same partition — key, member, account, or the whole batch for the
# tool — those that passed the level below, counted or their tokens summed. A batch of one has
# nothing ahead of it: zero, of the same type.
def _earlier(aggregate: str, alias: str, partition: str) -> str:
    by = f"PARTITION BY {partition} " if partition else ""
    return f"{aggregate} OVER ({by}ORDER BY {alias}.n ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"


def _earlier_tokens(passed: str, alias: str, partition: str) -> str:
    return f"COALESCE({_earlier(f'sum({alias}.reserve) FILTER (WHERE {passed})', alias, partition)}, 0)"


_NO_CALLS, _NO_TOKENS = "CAST(0 AS bigint)", "CAST(0 AS numeric)"
_AHEAD: dict[str, tuple[str, str]] = {
    "eligible_ahead_of_key": (_earlier("count(*) FILTER (WHERE c.eligible)", "c", "c.api_key_id"), _NO_CALLS),
    "key_ok_tokens_ahead_of_member": (_earlier_tokens("c.key_ok", "c", "c.org_id, c.user_id"), _NO_TOKENS),
    "member_ok_ahead": (_earlier("count(*) FILTER (WHERE c.member_ok)", "c", "c.sub_id"), _NO_CALLS),
    "member_ok_tokens_ahead": (_earlier_tokens("c.member_ok", "c", "c.sub_id"), _NO_TOKENS),
    "account_ok_ahead_of_tool": (_earlier("count(*) FILTER (WHERE c.account_ok)", "c", ""), _NO_CALLS),
    "admitted_ahead": (_earlier("count(*) FILTER (WHERE d.admitted)", "d", "d.sub_id"), _NO_CALLS),
    "admitted_tokens_ahead": (_earlier_tokens("d.admitted", "d", "d.sub_id"), _NO_TOKENS),
    "admitted_ahead_of_key": (_earlier("count(*) FILTER (WHERE d.admitted)", "d", "d.api_key_id"), _NO_CALLS),
    "admitted_tokens_ahead_of_member": (
        _earlier_tokens("d.admitted", "d", "d.org_id, d.user_id"),
        _NO_TOKENS,
    ),
    "admitted_ahead_of_tool": (_earlier("count(*) FILTER (WHERE d.admitted)", "d", ""), _NO_CALLS),
}


@dataclass(frozen=True)
class AdmitShape:
    """What a batch can need of the admission statement.

    PostgreSQL starts every part of a statement on every execution — the parts that read or change
    no row included — and for the one-call batches of a quiet hub that start is most of the
    statement's cost. So a batch runs the statement rendered with the parts its calls can reach
    (`_admit_sql`): the rules stay written once, in the template, and a part left out is one that
    could only have found nothing."""

    many: bool  # more than one call: line them up, add up per key, in key order (`batch_sql.per_key`)
    sessions: bool  # some call presents an access token
    keys: bool  # some call presents an API key (its own limit, its organization, its last use)
    orgs: bool  # some call may bill an organization: it asks with X-Org-ID, or it presents a key
    idempotent: bool  # the lone call has an Idempotency-Key, whose record is read with the rest

    @staticmethod
    def of(reqs: list[AdmitRequest]) -> AdmitShape:
        credentials = [r.credential for r in reqs]
        keys = any(c.is_api_key for c in credentials)
        return AdmitShape(
            many=len(reqs) > 1,
            sessions=any(not c.is_api_key for c in credentials),
            keys=keys,
            orgs=keys or any(c.org_id is not None for c in credentials),
            idempotent=len(reqs) == 1 and reqs[0].idempotency_key is not None,
        )


@lru_cache(maxsize=64)
def _admit_sql(shape: AdmitShape) -> TextClause:
    """The admission statement for batches of this shape."""
    who = credential_users(
        "grp.session_id",
        "grp.user_id",
        "grp.key_digest",
        "grp.org_id",
        sessions=shape.sessions,
        keys=shape.keys,
    )
    ahead = {name: (window if shape.many else zero) for name, (window, zero) in _AHEAD.items()}
    order = in_key_order(4, many=shape.many)
    return text(
        _ADMIT_TEMPLATE.format(
            who=who,
            lk_key=_LOCK_KEYS if shape.keys else _NO_KEYS,
            member=_MEMBERS if shape.orgs else _NO_MEMBERS,
            lk_member=_LOCK_MEMBERS if shape.orgs else _NO_MEMBERS_LOCKED,
            after_keys=after("lk_key"),
            after_members=after("lk_member"),
            touch=_TOUCH_KEYS if shape.keys else "",
            idem_columns=_IDEM_COLUMNS if shape.idempotent else _NO_IDEM_COLUMNS,
            idem_join=_IDEM_JOIN if shape.idempotent else "",
            member_adm=_MEMBERS_RESERVE if shape.orgs else "",
            key_rate=_KEYS_RATE if shape.keys else "",
            limited_org=_MEMBERS_LIMITED.format(in_key_order=order) if shape.orgs else "",
            in_key_order=order,
            admitted_per_account=per_key(
                ["sub_id"],
                [
                    Total("plan_rpm", MAX, "plan_rpm"),
                    Total("1", COUNT, "calls"),
                    Total("reserve", SUM, "reserve"),
                ],
                "decided",
                many=shape.many,
                where="admitted",
            ),
            admitted_calls=per_key(
                [], [Total("1", COUNT, "calls")], "decided", many=shape.many, where="admitted"
            ),
            refused=per_key(
                [
                    "j.user_id",
                    "j.org_id",
                    "CAST(:tool_id AS uuid) AS tool_id",
                    "j.plan_code",
                    "get_byte(uuid_send(j.user_id), 15) % 16 AS shard",
                ],
                [Total("1", COUNT, "calls")],
                "judged AS j",
                many=shape.many,
                where="j.passes_gate"
                " AND NOT (j.plan_rate_ok AND j.key_rate_ok AND j.tool_rate_ok AND j.concurrency_ok)",
            ),
            refused_per_platform_row=per_key(
                ["CAST(:now AS timestamptz) AT TIME ZONE 'UTC'", "tool_id", "plan_code", "shard"],
                [Total("calls")],
                "refused",
                many=shape.many,
            ),
            **ahead,
        )
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

# Settle one call — or a batch of calls, of one account or of many (group commit,
# `group_commit.py`) — in one statement: `req` is the batch; `l` locks the calls' pending logs
# (a log the sweep closed meanwhile is no longer pending, so nothing below happens for it);
# `charge` adds up what they cost and held, per account; `lk_sub` locks those accounts in id
# order; `sub` charges each account and releases its reservations; `log` writes each outcome,
# stamped with the settle time clamped into the period the tokens were charged to (so
# tokens_used always equals the sum of the current period's logs);
# `idem` stores each answer for replay; `settled` feeds the rollup upserts (`rollups.ROLLUP_CTES`);
# the quota thresholds the charge crosses are decided and their events written to the outbox
# (`webhooks/quota_alerts.py`: exactly one settle crosses each threshold, since settles of one
# subscription take its row lock one after another). The `{…}` parts are filled in for the batch's
# shape (`SettleShape`, `_settle_sql` below).
_SETTLE_TEMPLATE = """
    WITH req AS (
        SELECT * FROM unnest(
            CAST(:log_ids AS uuid[]), CAST(:statuses AS varchar[]), CAST(:tokens AS bigint[]),
            CAST(:durations AS integer[]), CAST(:error_codes AS varchar[]), CAST(:token_sources AS varchar[]),
            CAST(:idem_ids AS uuid[]), CAST(:response_statuses AS integer[]),
            CAST(:response_bodies AS text[]), CAST(:input_tokens AS bigint[]),
            CAST(:output_tokens AS bigint[]), CAST(:started_ats AS timestamptz[]))
        AS r(log_id, status, tokens, duration_ms, error_code, token_source, idem_id, response_status,
             response_body, input_tokens, output_tokens, started_at)
    ), l AS (
        SELECT u.id, u.subscription_id, u.tokens_reserved, u.org_id, u.user_id AS member_id, req.*
        FROM usage_logs AS u JOIN req ON u.id = req.log_id AND u.started_at = req.started_at
        WHERE u.status = 'pending' AND u.started_at >= :started_lo AND u.started_at <= :started_hi
        {in_id_order}FOR UPDATE OF u
    ), charge AS ({charge}
    ){lock_accounts}, sub AS (
        UPDATE subscriptions AS s
        SET tokens_used = s.tokens_used + charge.tokens,
            tokens_reserved = GREATEST(s.tokens_reserved - charge.reserved, 0),
            inflight = GREATEST(s.inflight - charge.calls, 0)
        FROM charge{locked_accounts}
        WHERE s.id = charge.subscription_id
        RETURNING s.id, s.user_id, s.tokens_used - charge.tokens AS tokens_before, s.tokens_used,
                  s.current_period_start, s.current_period_end,
                  (SELECT p.token_limit FROM plans AS p WHERE p.code = s.plan_code) AS token_limit, s.org_id
    ){member_charge}, log AS (
        UPDATE usage_logs AS u
        SET status = l.status, tokens_used = l.tokens, duration_ms = l.duration_ms, error_code = l.error_code,
            token_source = l.token_source, input_tokens = l.input_tokens, output_tokens = l.output_tokens,
            "timestamp" = COALESCE(
                LEAST(GREATEST(CAST(:now AS timestamptz), sub.current_period_start),
                      sub.current_period_end - interval '1 microsecond'),
                CAST(:now AS timestamptz))
        FROM l LEFT JOIN sub ON sub.id = l.subscription_id
        WHERE u.id = l.id AND u.started_at = l.started_at
          AND u.started_at >= :started_lo AND u.started_at <= :started_hi
        RETURNING u.id, u.user_id, u.tool_id, u.plan_code, u."timestamp", u.status, u.tokens_used,
                  u.input_tokens, u.output_tokens, u.org_id, u.subscription_id
    ){idem}, settled AS (
        SELECT user_id, org_id, tool_id, COALESCE(plan_code, '') AS plan_code,
               get_byte(uuid_send(user_id), 15) % 16 AS shard, "timestamp" AS ts,
               CAST(status = 'success' AS integer) AS success, CAST(status = 'error' AS integer) AS error,
               CAST(status = 'timeout' AS integer) AS timeout,
               CAST(status = 'cancelled' AS integer) AS cancelled,
               tokens_used AS tokens, input_tokens, output_tokens
        FROM log
    ), {rollups}, {quota_alerts}
    SELECT log.id, sub.tokens_used, sub.current_period_end, sub.token_limit
    FROM log LEFT JOIN sub ON sub.id = log.subscription_id
    """
# the parts of `_SETTLE_TEMPLATE` only some batches need (`SettleShape`)
_MEMBERS_CHARGE = """, member_charge AS (
        -- an organization call's member: charged in the period the organization was charged in,
        -- after the subscription's row lock (the admission's lock order: account, then member)
        UPDATE organization_members AS m
        SET tokens_used = CASE WHEN m.period_end = sub.current_period_end THEN m.tokens_used ELSE 0 END
                          + mc.tokens,
            tokens_reserved = GREATEST(m.tokens_reserved - mc.reserved, 0),
            period_end = sub.current_period_end
        FROM ({per_member}) AS mc
        JOIN sub ON sub.id = mc.subscription_id
        WHERE m.org_id = mc.org_id AND m.user_id = mc.member_id
    )"""
# a batch may charge several accounts: their rows are locked in one order (by id) in every settle,
# so two batches sharing accounts cannot deadlock (a lone call's account is locked by its update)
_LOCK_ACCOUNTS = """, lk_sub AS (
        SELECT s.id FROM subscriptions AS s JOIN charge ON s.id = charge.subscription_id
        ORDER BY s.id
        FOR NO KEY UPDATE OF s
    )"""
_IDEM_ANSWERS = """, idem AS (
        UPDATE idempotency_keys AS k
        SET state = 'done', response_status = l.response_status,
            response_body = CAST(l.response_body AS jsonb), usage_log_id = l.id
        FROM l WHERE k.id = l.idem_id
    )"""


@dataclass(frozen=True)
class SettleShape:
    """What a batch can need of the settle statement (why it matters: `AdmitShape`)."""

    personal: bool  # some call billed its caller's own account: the personal read models
    orgs: bool  # some call billed an organization: its member's share, its read model
    idempotent: bool  # some call has an Idempotency-Key: its answer is stored for replay
    many: bool  # more than one call: add up per key and lock in order (`batch_sql.per_key`)

    @staticmethod
    def of(reqs: list[SettleRequest]) -> SettleShape:
        return SettleShape(
            personal=any(r.admission.org_id is None for r in reqs),
            orgs=any(r.admission.org_id is not None for r in reqs),
            idempotent=any(r.admission.idem_id is not None for r in reqs),
            many=len(reqs) > 1,
        )


@lru_cache(maxsize=16)
def _settle_sql(shape: SettleShape) -> TextClause:
    """The settle statement for batches of this shape."""
    many = shape.many
    per_member = per_key(
        ["org_id", "member_id", "subscription_id"],
        [Total("tokens", SUM, "tokens"), Total("tokens_reserved", SUM, "reserved")],
        "l",
        many=many,
        where="org_id IS NOT NULL",
    )
    return text(
        _SETTLE_TEMPLATE.format(
            in_id_order=in_key_order(1, many=many),
            charge=per_key(
                ["subscription_id"],
                [
                    Total("tokens", SUM, "tokens"),
                    Total("tokens_reserved", SUM, "reserved"),
                    Total("1", COUNT, "calls"),
                ],
                "l",
                many=many,
            ),
            lock_accounts=_LOCK_ACCOUNTS if many else "",
            locked_accounts=" JOIN lk_sub ON lk_sub.id = charge.subscription_id" if many else "",
            member_charge=_MEMBERS_CHARGE.format(per_member=per_member) if shape.orgs else "",
            idem=_IDEM_ANSWERS if shape.idempotent else "",
            rollups=rollups.rollup_ctes(personal=shape.personal, orgs=shape.orgs, many=many),
            quota_alerts=quota_alerts.QUOTA_ALERT_CTES,
        )
    )


# How a call that a settle found no longer pending was closed (see `MeteringStore.settle`).
_OUTCOME = text(
    """
    SELECT u.status, u.error_code, s.tokens_used, s.current_period_end,
           (SELECT p.token_limit FROM plans AS p WHERE p.code = s.plan_code) AS token_limit
    FROM usage_logs AS u LEFT JOIN subscriptions AS s ON s.id = u.subscription_id
    WHERE u.id = :log_id AND u.started_at = :started_at
    """
)


def _release_reservations(logs: str) -> str:
    """CTEs (`released`, `released_members`) giving back what the pending logs of the CTE `logs`
    (columns subscription_id, tokens_reserved, org_id, user_id) hold on their subscriptions (the
    reserved tokens and the in-flight count) and, for organization calls, on their members — the
    subscription first, then the member (the admission's lock order): one rule for the sweep and
    the admission undo."""
    return f"""
    released AS (
        UPDATE subscriptions AS s
        SET tokens_reserved = GREATEST(s.tokens_reserved - x.reserved, 0),
            inflight = GREATEST(s.inflight - x.calls, 0)
        FROM (SELECT subscription_id, SUM(tokens_reserved) AS reserved, COUNT(*) AS calls
              FROM {logs} GROUP BY subscription_id) AS x
        WHERE s.id = x.subscription_id
        RETURNING s.id
    ), released_members AS (
        UPDATE organization_members AS m
        SET tokens_reserved = GREATEST(m.tokens_reserved - x.reserved, 0)
        FROM (SELECT subscription_id, org_id, user_id, SUM(tokens_reserved) AS reserved
              FROM {logs} WHERE org_id IS NOT NULL GROUP BY 1, 2, 3) AS x
        JOIN released ON released.id = x.subscription_id
        WHERE m.org_id = x.org_id AND m.user_id = x.user_id
    )
    """  # noqa: S608 (a CTE name of ours, never a value)


# Undo admissions whose reply was lost (their connection failed under the statement): their
# pending logs go, with their reservations. A no-op for a statement that never ran. Nothing else
# refers to such a log — no call was made for it, and without an Idempotency-Key no key names it.
_UNDO_ADMISSIONS = text(
    """
    WITH l AS (
        DELETE FROM usage_logs
        WHERE id = ANY(CAST(:log_ids AS uuid[])) AND started_at = :started_at AND status = 'pending'
        RETURNING subscription_id, tokens_reserved, org_id, user_id
    ), """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
    + _release_reservations("l")
    + "SELECT 1"
)

_CLOSE_STALE = text(
    """
    WITH stale AS (
        UPDATE usage_logs AS u
        SET status = 'error', error_code = :abandoned, tokens_used = 0,
            "timestamp" = LEAST(CAST(:now AS timestamptz), u.started_at + CAST(:settle_window AS interval)),
            duration_ms = LEAST(EXTRACT(EPOCH FROM (CAST(:now AS timestamptz) - u.started_at)) * 1000,
                                2147483647)::int
        WHERE (u.id, u.started_at) IN (
            SELECT l.id, l.started_at FROM usage_logs AS l JOIN tools AS t ON t.id = l.tool_id
            WHERE l.status = 'pending' AND l.started_at < :cutoff
              AND l.started_at < CAST(:now AS timestamptz) - make_interval(
                    secs => t.timeout_seconds * t.max_attempts + 5 * t.max_attempts + :slack
                            + CASE WHEN t.streaming OR t.protocol = 'openai' THEN :stream_max ELSE 0 END)
            ORDER BY l.started_at LIMIT 1000
            FOR UPDATE OF l SKIP LOCKED)
        RETURNING u.id, u.user_id, u.tool_id, u.plan_code, u.subscription_id, u.tokens_reserved, u.org_id
    ), """  # noqa: S608 (constant SQL pieces joined at import; values are bound)
    + _release_reservations("stale")
    + """, unclaimed AS (
        DELETE FROM idempotency_keys AS k USING stale
        WHERE k.usage_log_id = stale.id AND k.state = 'in_flight'
    )
    SELECT id, user_id, tool_id, plan_code, org_id FROM stale
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


def _admission_read(row: Record, now: datetime) -> AdmissionRead:
    """What the statement read, as the call of this row saw it: with the calls admitted ahead of
    it in its batch already holding their tokens, their slots and their places in each limit."""
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
            protocol=row["protocol"],
            upstream_model=row["upstream_model"],
            name=row["tool_name"],
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
            tokens_reserved=row["tokens_reserved"] + int(row["ahead_tokens"]),
            current_period_end=row["current_period_end"],
            expires_at=row["expires_at"],
        )
    stored = None
    if row["idem_state"] is not None:
        stored = StoredKey(row["idem_state"], bytes(row["idem_hash"]), row["idem_status"], row["idem_body"])
    member = None
    if row["org_id"] is not None:
        member = MemberRead(
            token_limit=row["member_limit"],
            tokens_used=row["member_used"] or 0,
            tokens_reserved=(row["member_reserved"] or 0) + int(row["member_ahead_tokens"]),
        )
    return AdmissionRead(
        user_id=row["user_id"],
        tool=tool,
        account=account,
        stored=stored,
        limits=_limits(row, now),
        org_id=row["org_id"],
        org_denied=row["user_id"] is not None and row["asked_org_id"] is not None and row["org_id"] is None,
        member=member,
    )


# the per-minute limits, in the contract's order, their columns' prefix in the admission's answer, and
# the column counting the calls of the batch admitted ahead under that limit (the plan's: the
# account's calls)
_BUCKETS: tuple[tuple[Scope, str, str], ...] = (
    ("plan", "plan", "ahead"),
    ("api_key", "key", "key_ahead"),
    ("tool", "tool", "tool_ahead"),
)


def _limits(row: Record, now: datetime) -> Limits:
    """The limits that apply to the call, in the contract's order (`rate_limits.py`), each with
    the calls admitted ahead of it in its batch counted."""
    buckets = []
    for scope, p, ahead_column in _BUCKETS:
        rpm = row[f"{p}_rpm"]
        if rpm is None:
            continue
        ahead = int(row[ahead_column])
        start = max(row[f"{p}_tat"] or now, now)
        interval = timedelta(seconds=60) / rpm
        tat = start + ahead * interval if ahead else row[f"{p}_tat"]
        new_tat = start + (ahead + 1) * interval if row["admitted"] else None
        buckets.append(Bucket(scope, rpm, tat, row[f"{p}_rate_ok"], new_tat))
    concurrency = None
    if row["max_concurrent"] is not None:
        concurrency = Concurrency(
            row["max_concurrent"], row["inflight"] + int(row["ahead"]), row["concurrency_ok"]
        )
    return Limits(tuple(buckets), concurrency)


def _admit_result(row: Record, req: AdmitRequest, now: datetime) -> AdmitResult:
    read = _admission_read(row, now)
    if not row["admitted"]:
        return AdmitResult(read, None)
    assert read.user_id is not None and read.tool is not None and read.account is not None
    admission = Admission(
        log_id=req.log_id,
        user_id=read.user_id,
        subscription_id=read.account.subscription_id,
        plan_code=read.account.plan_code,
        tool=read.tool,
        quota=read.account.quota,
        started_at=req.now,  # the call's own admission time: its retry reuses it (`admit._recover`)
        tokens_left=read.account.token_limit - read.account.tokens_used - read.account.tokens_reserved,
        limits=read.limits,
        org_id=read.org_id,
    )
    return AdmitResult(read, admission)


def close_stale_statement(settings: Settings, now: datetime) -> tuple[TextClause, dict[str, Any]]:
    """The sweep's statement closing abandoned calls (`MeteringStore.close_stale`) and its parameters."""
    return _CLOSE_STALE, {
        "now": now,
        "cutoff": now - timedelta(seconds=settings.stale_invocation_seconds),
        "slack": STALE_SLACK_SECONDS,
        "stream_max": settings.tool_stream_max_seconds,
        "abandoned": ABANDONED,
        "settle_window": SETTLE_WINDOW,
    }


def settle_statement(reqs: list[SettleRequest]) -> tuple[TextClause, dict[str, Any]]:
    """The settle statement for a batch and its parameters: the batch as the statement's arrays
    (one element per call), settled at the latest `now`."""
    return _settle_sql(SettleShape.of(reqs)), {
        "now": max(r.now for r in reqs),
        "log_ids": [r.admission.log_id for r in reqs],
        "started_ats": [r.admission.started_at for r in reqs],
        # the bounds let PostgreSQL open only the partitions the batch's logs live in
        "started_lo": min(r.admission.started_at for r in reqs),
        "started_hi": max(r.admission.started_at for r in reqs),
        "statuses": [r.status for r in reqs],
        "tokens": [r.tokens for r in reqs],
        "durations": [r.duration_ms for r in reqs],
        "error_codes": [r.error_code for r in reqs],
        "token_sources": [r.token_source for r in reqs],
        "idem_ids": [r.admission.idem_id for r in reqs],
        "response_statuses": [r.response_status for r in reqs],
        "response_bodies": [
            encode_response(r.response_body, r.media_type) if r.admission.idem_id is not None else None
            for r in reqs
        ],
        "input_tokens": [r.input_tokens for r in reqs],
        "output_tokens": [r.output_tokens for r in reqs],
    }


def _quota_of(row: Mapping[Any, Any]) -> Quota | None:
    if row["tokens_used"] is None or row["token_limit"] is None:
        return None
    return Quota(row["token_limit"], row["tokens_used"], row["current_period_end"])


def _one_account_per_key(reqs: list[AdmitRequest]) -> list[list[AdmitRequest]]:
    """The batch in consecutive parts in which no API key comes with two `X-Org-ID`s.

    The admission statement ranks a batch level by level — key, member, account, tool — and its
    decisions are those of calls coming one by one only while each level's calls belong to one
    partition of the next: a key to one account. A personal key sent once with `X-Org-ID` and
    once without bills two accounts; such calls go in separate statements, in order."""
    parts: list[list[AdmitRequest]] = [[]]
    orgs: dict[bytes, uuid.UUID | None] = {}
    for req in reqs:
        digest = req.credential.api_key_digest
        if digest is not None and orgs.setdefault(digest, req.credential.org_id) != req.credential.org_id:
            parts.append([])
            orgs = {digest: req.credential.org_id}
        parts[-1].append(req)
    return parts


# ---------------------------------------------------------------------------------------------
# Failures: which ones a caller may retry
# ---------------------------------------------------------------------------------------------


def connection_lost(exc: BaseException) -> bool:
    """The connection failed under the statement (not a pool that ran dry: waiting again for a
    connection to undo and retry would only wait longer)."""
    return is_db_unavailable(exc) and not isinstance(exc, PoolTimeout)


def log_id_taken(exc: BaseException) -> bool:
    """The admission failed on the usage log's primary key: its id was already taken."""
    if not isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return False
    # the key of the monthly partition the row went to (`usage_logs_p202612_pkey`), or the parent's
    name = exc.constraint_name or ""
    return name == "pk_usage_logs" or (name.startswith("usage_logs_") and name.endswith("_pkey"))


def transient(exc: BaseException) -> bool:
    """A failure worth retrying: the database unreachable or restarting, the pool exhausted, a
    deadlock or serialization failure — whether SQLAlchemy wrapped it or asyncpg raised it."""
    return (
        isinstance(exc, PoolTimeout) or is_db_unavailable(exc) or bool(sqlstates(exc) & _RETRYABLE_SQLSTATES)
    )


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def admit_statement(reqs: list[AdmitRequest]) -> tuple[TextClause, dict[str, Any]]:
    """The admission statement for a batch (one tool and version, `batch_key`; one account per API
    key, `_one_account_per_key`) and its bound parameters."""
    first = reqs[0]
    now = max(r.now for r in reqs)
    callers: dict[Credential, int] = {}  # the batch's credentials, numbered from 1 (`grp`)
    for r in reqs:
        callers.setdefault(r.credential, len(callers) + 1)
    return _admit_sql(AdmitShape.of(reqs)), {
        "cred_session_ids": [c.session_id for c in callers],
        "cred_user_ids": [c.user_id for c in callers],
        "cred_key_digests": [c.api_key_digest for c in callers],
        "cred_org_ids": [c.org_id for c in callers],
        "callers": [callers[r.credential] for r in reqs],
        "now": now,
        "tool_id": first.tool_id,
        "tool_version": first.tool_version,
        "idempotency_key": first.idempotency_key if len(reqs) == 1 else None,
        "touch_before": now - API_KEY_TOUCH_INTERVAL,
        "log_ids": [r.log_id for r in reqs],
        "reserves": [r.reserve for r in reqs],
        "request_ids": [r.request_id for r in reqs],
        "gos": [r.go for r in reqs],
        "started_ats": [r.now for r in reqs],
    }


class MeteringConnection:
    """One pooled connection's worth of admission statements: the admission itself and, with an
    Idempotency-Key, the key's claim — in one transaction when the caller opens one."""

    def __init__(self, session: DriverSession) -> None:
        self._session = session

    def transaction(self) -> Any:
        """`async with conn.transaction():` — the statements inside commit together or not at all."""
        return self._session.driver.transaction()

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        return (await self.admit_many([req]))[0]

    async def admit_many(self, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        """Admit a batch of calls (one tool, any callers: `AdmitRequest.batch_key`), deciding each
        as if they had come one by one, in order: in one statement, or in a few one after another
        when an API key bills two accounts in the batch (`_one_account_per_key`)."""
        results: list[AdmitResult] = []
        for part in _one_account_per_key(reqs):
            results += await self._admit_statement(part)
        return results

    async def _admit_statement(self, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        statement, params = admit_statement(reqs)
        rows = await self._session.fetch(statement, params)
        now: datetime = params["now"]  # the batch's: the latest of its calls' (`admit_statement`)
        return [_admit_result(row, req, now) for row, req in zip(rows, reqs, strict=True)]

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
        # the connections of finished statements: the next statement's, or back to the pool soon
        self.releases = Releases()
        # the settles that arrive while one is being written go together in the next statement,
        # whichever accounts they charge (`settle`)
        self._settles: GroupCommit[int, SettleRequest, Settlement] = GroupCommit("settle", self._settle_batch)

    @asynccontextmanager
    async def connection(self, *, ping: bool) -> AsyncIterator[MeteringConnection]:
        """A pooled connection for the admission. Without `ping` a connection used within the
        last second comes without the pre-ping round trip (`db.connect_retried`): the caller must
        then be ready to admit again when it turns out dead (`admit.AdmissionRun._recover`)."""
        async with self._pooled(ping=ping) as session:
            yield MeteringConnection(session)

    @asynccontextmanager
    async def _pooled(self, *, ping: bool) -> AsyncIterator[DriverSession]:
        """A connection's `DriverSession` for the caller's block: closed at once when the block
        fails, otherwise held for the next statement (`Releases`)."""
        # a connection a statement just finished with (no ping: in use a moment ago, and the
        # caller retries on a dead one like on any connection taken without it), else the pool's;
        # the others held go back while this statement runs (or while it waits for a connection)
        conn = None if ping else self.releases.take()
        self.releases.flush()
        if conn is None:
            conn = await checkout(self.engine, retried=not ping)
        try:
            yield DriverSession(await driver_of(conn))
        except BaseException as exc:
            if isinstance(exc, Exception) and connection_lost(exc):
                # asyncpg raised it, not SQLAlchemy: tell the pool this connection is done
                await conn.invalidate()
            await conn.close()
            raise
        self.releases.hold(conn)

    async def admit_batch(self, reqs: list[AdmitRequest]) -> list[AdmitResult]:
        """A batch of calls without Idempotency-Keys, on a connection taken without the pre-ping
        (`connection`): its callers admit again, one by one, when it turns out dead."""
        async with self.connection(ping=False) as conn:
            return await conn.admit_many(reqs)

    async def undo_admissions(self, log_ids: list[uuid.UUID], started_at: datetime) -> None:
        """Take back admissions made without an Idempotency-Key whose outcome is unknown (all
        admitted at `started_at`: the request's own admission time, the partition key)."""
        if log_ids:
            async with self.engine.begin() as conn:
                await conn.execute(_UNDO_ADMISSIONS, {"log_ids": log_ids, "started_at": started_at})

    async def settle(self, req: SettleRequest) -> Settlement:
        """Settle a call: group-committed with the calls being settled meanwhile (`group_commit.py`).

        Settles of *different* accounts are batched too: a settle locks each of its accounts'
        rows in id order (`_settle_sql`), so one statement charges many accounts as exactly as it
        charges one, and with one commit. Calls of many separate callers then cost PostgreSQL one
        statement start and one WAL flush per batch, not per call. `SETTLE_LINES` lines (by
        subscription) keep two statements under way at once, so a batch waiting on one hot
        account's row lock does not hold up every other settle of the process."""
        line = req.admission.subscription_id.int % SETTLE_LINES
        return await self._settles.submit(line, req)

    async def _settle_batch(self, reqs: list[SettleRequest]) -> list[Settlement]:
        """`settle_many`, retried a few times on transient database errors.

        A blip must not turn a completed call into one the sweep closes as abandoned. Retrying is
        safe: a first attempt that committed without us hearing back leaves nothing `pending`, so
        the retry settles nothing twice — and `_settled_before` then tells that case (charged, by
        the attempt whose reply was lost) from a call the sweep closed meanwhile (not charged).
        """
        retried = False
        for delay in SETTLE_RETRY_DELAYS:
            try:
                settled = await self.settle_many(reqs)
                break
            except Exception as exc:
                if not transient(exc):
                    raise
                log.warning(
                    "settle failed; retrying",
                    extra={"invocations": len(reqs), "error": type(exc).__name__},
                )
                retried = True
                await asyncio.sleep(delay)
        else:
            settled = await self.settle_many(reqs)
        return [
            settled.get(req.admission.log_id) or await self._settled_before(req, retried=retried)
            for req in reqs
        ]

    async def settle_many(self, reqs: list[SettleRequest]) -> dict[uuid.UUID, Settlement]:
        """Write the outcomes, charge, release, store the idempotent answers, bump the rollups: one
        statement, outside any explicit transaction (a single statement is atomic on its own and
        needs no BEGIN/COMMIT round trips). The calls it settled, by usage log id."""
        async with self._pooled(ping=False) as session:  # `_settle_batch` retries a dead connection
            rows = await session.fetch(*settle_statement(reqs))
        return {row["id"]: Settlement(True, _quota_of(row)) for row in rows}

    async def _settled_before(self, req: SettleRequest, *, retried: bool) -> Settlement:
        """Why a settle found nothing pending: the sweep closed the call (not charged), or an
        earlier attempt of this very settle committed and only its reply was lost (charged)."""
        log_id = req.admission.log_id
        context = {"invocation_id": str(log_id), "outcome": req.status}
        try:
            async with self.engine.connect() as conn:
                params = {"log_id": log_id, "started_at": req.admission.started_at}
                row = (await conn.execute(_OUTCOME, params)).mappings().first()
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
        rows = (await session.execute(*close_stale_statement(settings, now))).all()

        # the stable order rollups asks for (tool, plan, shard), so two sweepers bumping shared
        # platform rows do not deadlock; any residual conflict is a retry at the next pass
        def order(r: Any) -> tuple[str, str, int, str]:
            return (str(r.tool_id), r.plan_code or "", rollups.platform_shard(r.user_id), str(r.user_id))

        for row in sorted(rows, key=order):
            await rollups.bump(
                session,
                user_id=row.user_id,
                org_id=row.org_id,
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

"""Usage for the caller (API.md §6): history, summary, timeseries and the CSV export.

Privacy: every query here is filtered by the caller's `user_id`; nothing takes a user id from
the request. Pending rows (admitted, not yet settled) are never shown or counted: raw queries
filter on `SETTLED` (success, error, timeout, cancelled: the `UsageStatus` literal), and the
rollups only ever count settled rows (`rollups.bump` runs in the settle transaction).

A `cancelled` call (the caller hung up mid-stream, API.md §5.1) is settled and charged for what
was relayed: it is listed, exported and counted in every total and token sum like any other
settled call; the summary counts it apart from both the successful and the failed calls.

Where each answer comes from, and what it costs (none of it grows with the table's total rows;
the rollups are described in `rollups.py`):

- **Summary** reads `usage_daily` for the whole UTC days inside the range and, for the ragged
  edges when the range does not start/end on a day boundary (the default billing period almost
  never does), scans the caller's raw logs of those partial days only, through the
  `(user_id, timestamp)` index. We chose the bounded raw scan over `usage_hourly` because the
  summary needs the status and per-tool breakdown that the hourly rollup does not carry. Cost:
  O(days in range x tools) rollup rows + O(the caller's logs in at most two partial days). A user
  with an extreme daily volume makes the edges the dominant cost; the way out then is a
  per-tool/status hourly rollup (the edge shrinks to two partial hours).
- **Timeseries**: `hour` reads `usage_hourly` for whole hours plus a raw scan of at most two
  partial hours; `day` reads `usage_user_daily` (one row per day) for whole days, and each
  partial edge day from `usage_hourly` (its whole hours) plus a raw scan of at most one partial
  hour per side. Partial buckets therefore count exactly the part of the bucket inside the
  range, so the buckets always add up to the summary's totals. Empty buckets are filled in
  Python. Cost: O(buckets), whatever the user's volume.
- **History** (`GET /usage`) walks the `(user_id, timestamp)` index backwards (newest first,
  `id` as the tie-break) with OFFSET/LIMIT; deep offsets cost O(offset) (keyset paging would be
  the fix, the contract asks for offset). Its `total` is *not* a count of raw rows: a user with a
  million logs would make that a million-entry scan. It is the same rollup sum as the summary
  (whole days from `usage_daily`, filtered by tool and by status via the per-status columns)
  plus a raw count of the ragged edge days, so it costs what a summary costs, and it equals the
  number of listed rows because the rollups are written in the same transaction as the logs.
  A first page shorter than `limit` skips the count altogether.
- **Export** reads the rows in keyset-paginated batches (`(timestamp, id)` below the last row
  sent, newest first, along the same index), each batch in a short transaction of its own
  that ends before the batch is sent: no connection or transaction is held while the client
  reads, however slowly, so stalled downloads cannot drain the pool. Memory stays at one batch.
  A user may run at most MAX_CONCURRENT_EXPORTS at once, across every worker and instance
  (`core/leases.py`: a lease renewed while the export runs); past it, 429 RATE_LIMITED.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, get_args

from sqlalchemy import (
    ColumnElement,
    Select,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core.clock import iso_utc
from joyhub.core.errors import RateLimited, ValidationFailed, field_error
from joyhub.core.leases import Lease, Leases
from joyhub.core.pagination import Page
from joyhub.models import Plan, Subscription, Tool, UsageLog
from joyhub.subscriptions.rollover import apply_locked, is_due
from joyhub.usage.dates import (
    DAY,
    HOUR,
    Bound,
    TimeRange,
    buckets,
    ceil_to,
    floor_to,
    resolve,
    split,
)
from joyhub.usage.partitions import SETTLE_WINDOW, started_bounds
from joyhub.usage.schemas import (
    DailyRefusals,
    Quota,
    TimeseriesPoint,
    ToolUsageTokens,
    UsageRecord,
    UsageStatus,
    UsageSummary,
)

# The statuses a user sees: every settled outcome, never `pending`. One list for the ORM filter
# and the raw SQL below (a constant of ours, spliced in at import; no value of a request).
SETTLED: tuple[str, ...] = get_args(UsageStatus)
_SETTLED_SQL = ", ".join(f"'{status}'" for status in SETTLED)
MAX_SPAN = {"day": timedelta(days=366), "hour": timedelta(days=31)}
UNITS = {"day": DAY, "hour": HOUR}
EXPORT_BATCH = 2000
MAX_CONCURRENT_EXPORTS = 2
EXPORT_LEASE_TTL = timedelta(seconds=60)
EXPORT_RETRY_AFTER_SECONDS = 5
CSV_HEADER = (
    "id",
    "timestamp",
    "tool_id",
    "tool_name",
    "status",
    "tokens_used",
    "duration_ms",
    "request_id",
    "error_code",
    "token_source",  # appended last (issue 13): existing consumers' column positions stay
    "input_tokens",  # appended (issue 17): empty when the upstream reported none
    "output_tokens",
)


@dataclass(frozen=True)
class LogFilter:
    """Optional filters of the history and the export."""

    tool_id: uuid.UUID | None = None
    status: str | None = None


# --- predicates -------------------------------------------------------------------------------


# Built once: SQLAlchemy's `in_()` makes an expanding bind parameter that refers to itself, a
# reference cycle per call that only the cyclic GC frees (the expression is immutable: sharing it
# across statements is safe).
_IS_SETTLED = UsageLog.status.in_(SETTLED)


def _raw_window(
    user_id: uuid.UUID, start: datetime | None, end: datetime | None
) -> list[ColumnElement[bool]]:
    """The caller's settled logs in `[start, end)` of settle time, with the admission-time bounds
    that let PostgreSQL open only the monthly partitions that can hold them (`partitions.py`)."""
    # personal calls only: an organization's calls are the organization's usage (API.md §13)
    conds: list[ColumnElement[bool]] = [UsageLog.user_id == user_id, UsageLog.org_id.is_(None), _IS_SETTLED]
    started_lo, started_hi = started_bounds(start, end)
    if start is not None and started_lo is not None:
        conds += [UsageLog.timestamp >= start, UsageLog.started_at >= started_lo]
    if end is not None and started_hi is not None:
        conds += [UsageLog.timestamp < end, UsageLog.started_at < started_hi]
    return conds


def _raw_filters(filt: LogFilter) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if filt.tool_id is not None:
        conds.append(UsageLog.tool_id == filt.tool_id)
    if filt.status is not None:
        conds.append(UsageLog.status == filt.status)
    return conds


# --- what to read where ---------------------------------------------------------------------
#
# Every rollup read below is one static SQL statement (prepared once per connection by asyncpg):
# a whole-day part, up to two whole-hour spans and up to two raw pieces, the unused ones given
# empty ranges. Building SQLAlchemy expressions per request cost more CPU than the queries.

NOTHING = datetime(1970, 1, 1, tzinfo=UTC)  # an unused piece is the empty range [NOTHING, NOTHING)
FIRST_DAY, LAST_DAY = date(1, 1, 1), date(9999, 12, 31)
Span = tuple[datetime, datetime]


@dataclass(frozen=True)
class Reads:
    """How to answer `[start, end)`: whole UTC days `[d0, d1)` from a daily rollup, whole hours
    from `usage_hourly` (two spans), the rest from at most two raw pieces."""

    days: tuple[date, date] = (FIRST_DAY, FIRST_DAY)
    hours: tuple[Span, Span] = ((NOTHING, NOTHING), (NOTHING, NOTHING))
    raw: tuple[Span, Span] = ((NOTHING, NOTHING), (NOTHING, NOTHING))

    def params(self) -> dict[str, Any]:
        pieces = [p for p in self.raw if p[0] < p[1]]
        # the admission-time range of the raw pieces' logs: the partitions to open (none if none)
        s_lo = min(p[0] for p in pieces) - SETTLE_WINDOW if pieces else NOTHING
        s_hi = max(p[1] for p in pieces) if pieces else NOTHING
        return {
            "s_lo": s_lo,
            "s_hi": s_hi,
            "d0": self.days[0],
            "d1": self.days[1],
            "h1a": self.hours[0][0],
            "h1b": self.hours[0][1],
            "h2a": self.hours[1][0],
            "h2b": self.hours[1][1],
            "r1a": self.raw[0][0],
            "r1b": self.raw[0][1],
            "r2a": self.raw[1][0],
            "r2b": self.raw[1][1],
        }


def _two(spans: Sequence[Span]) -> tuple[Span, Span]:
    assert len(spans) <= 2, spans
    padded = [*spans, (NOTHING, NOTHING), (NOTHING, NOTHING)]
    return padded[0], padded[1]


def _days_of(whole: TimeRange | None) -> tuple[date, date]:
    if whole is None:
        return (FIRST_DAY, FIRST_DAY)
    lo = floor_to(whole.start, DAY).date() if whole.start is not None else FIRST_DAY
    hi = floor_to(whole.end, DAY).date() if whole.end is not None else LAST_DAY
    return (lo, hi)


def day_reads(rng: TimeRange) -> Reads:
    """Whole days from a daily rollup, the ragged edge days (at most two) from the raw logs."""
    if rng.start is not None and rng.end is not None and rng.start >= rng.end:
        return Reads()
    cut = split(rng, DAY)
    return Reads(days=_days_of(cut.whole), raw=_two(cut.edges))


def _span(whole: TimeRange) -> Span:
    assert whole.start is not None and whole.end is not None
    return (whole.start, whole.end)


def series_reads(rng: TimeRange, unit: timedelta) -> Reads:
    """For buckets of `unit`: whole days (day buckets only), whole hours, and the partial hours at
    both ends from the raw logs (only the range's very first and very last hour can be partial)."""
    assert rng.start is not None and rng.end is not None
    if rng.start >= rng.end:
        return Reads()
    if unit == HOUR:
        by_hour = split(rng, HOUR)
        whole = [_span(by_hour.whole)] if by_hour.whole is not None else []
        return Reads(hours=_two(whole), raw=_two(by_hour.edges))
    by_day = split(rng, DAY)
    hours: list[Span] = []
    raw: list[Span] = []
    for a, b in by_day.edges:  # each ragged day is cut again at hours
        cut = split(TimeRange(a, b), HOUR)
        if cut.whole is not None:
            hours.append(_span(cut.whole))
        raw.extend(cut.edges)
    return Reads(days=_days_of(by_day.whole), hours=_two(hours), raw=_two(raw))


_BY_TOOL = text(
    f"""
    SELECT x.tool_id, t.name, CAST(sum(x.inv) AS bigint), CAST(sum(x.ok) AS bigint),
           CAST(sum(x.failed) AS bigint), CAST(sum(x.cancelled) AS bigint),
           CAST(coalesce(sum(x.tok), 0) AS bigint), CAST(coalesce(sum(x.tin), 0) AS bigint),
           CAST(coalesce(sum(x.tout), 0) AS bigint)
    FROM (
        SELECT tool_id, sum(invocations) AS inv, sum(successes) AS ok, sum(errors + timeouts) AS failed,
               sum(cancelled) AS cancelled, sum(tokens) AS tok, sum(input_tokens) AS tin,
               sum(output_tokens) AS tout
        FROM usage_daily
        WHERE user_id = :user_id AND day >= :d0 AND day < :d1
        GROUP BY tool_id
        UNION ALL
        SELECT tool_id, count(*), count(*) FILTER (WHERE status = 'success'),
               count(*) FILTER (WHERE status IN ('error', 'timeout')),
               count(*) FILTER (WHERE status = 'cancelled'), sum(tokens_used), sum(input_tokens),
               sum(output_tokens)
        FROM usage_logs
        WHERE user_id = :user_id AND org_id IS NULL AND status IN ({_SETTLED_SQL})
          AND started_at >= :s_lo AND started_at < :s_hi
          AND (("timestamp" >= :r1a AND "timestamp" < :r1b)
               OR ("timestamp" >= :r2a AND "timestamp" < :r2b))
        GROUP BY tool_id
    ) AS x
    JOIN tools AS t ON t.id = x.tool_id
    GROUP BY x.tool_id, t.name
    """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
)

_COUNT = text(
    f"""
    SELECT CAST(
        coalesce((
            SELECT sum(CASE CAST(:status AS text) WHEN 'success' THEN successes WHEN 'error' THEN errors
                       WHEN 'timeout' THEN timeouts WHEN 'cancelled' THEN cancelled
                       ELSE invocations END)
            FROM usage_daily
            WHERE user_id = :user_id AND day >= :d0 AND day < :d1
              AND (CAST(:tool_id AS uuid) IS NULL OR tool_id = CAST(:tool_id AS uuid))
        ), 0)
        + (
            SELECT count(*) FROM usage_logs
            WHERE user_id = :user_id AND org_id IS NULL AND status IN ({_SETTLED_SQL})
              AND started_at >= :s_lo AND started_at < :s_hi
              AND (CAST(:status AS text) IS NULL OR status = CAST(:status AS text))
              AND (CAST(:tool_id AS uuid) IS NULL OR tool_id = CAST(:tool_id AS uuid))
              AND (("timestamp" >= :r1a AND "timestamp" < :r1b)
                   OR ("timestamp" >= :r2a AND "timestamp" < :r2b))
        ) AS bigint)
    """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
)

_SERIES = text(
    f"""
    SELECT CAST(day AS timestamp) AT TIME ZONE 'UTC' AS bucket, invocations AS inv, tokens AS tok
    FROM usage_user_daily
    WHERE user_id = :user_id AND day >= :d0 AND day < :d1
    UNION ALL
    SELECT hour, invocations, tokens
    FROM usage_hourly
    WHERE user_id = :user_id AND ((hour >= :h1a AND hour < :h1b) OR (hour >= :h2a AND hour < :h2b))
    UNION ALL
    SELECT CAST(:r1a AS timestamptz), count(*), coalesce(sum(tokens_used), 0)
    FROM usage_logs
    WHERE user_id = :user_id AND org_id IS NULL AND status IN ({_SETTLED_SQL})
      AND started_at >= :s_lo AND started_at < :s_hi AND "timestamp" >= :r1a AND "timestamp" < :r1b
    UNION ALL
    SELECT CAST(:r2a AS timestamptz), count(*), coalesce(sum(tokens_used), 0)
    FROM usage_logs
    WHERE user_id = :user_id AND org_id IS NULL AND status IN ({_SETTLED_SQL})
      AND started_at >= :s_lo AND started_at < :s_hi AND "timestamp" >= :r2a AND "timestamp" < :r2b
    """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
)


# --- the default range ------------------------------------------------------------------------


def last_days(now: datetime, days: int) -> TimeRange:
    """`days` whole UTC days ending with today (today included)."""
    tomorrow = floor_to(now, DAY) + DAY
    return TimeRange(tomorrow - days * DAY, tomorrow)


@dataclass(frozen=True)
class Period:
    """The default range of summaries and timeseries, and the quota when there is one."""

    range: TimeRange
    quota: Quota | None


async def _current_period(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> Period:
    """The caller's current billing period (active subscription, rolled forward if due), else the
    last 30 days. A cancelled or expired subscription's last period is history, not "current".

    One query reads the subscription with its plan's limit; only a subscription that is due goes
    through the locking rollover (`rollover.apply_locked`), as `ensure_current` would."""
    row = (
        await session.execute(
            select(Subscription, Plan.token_limit)
            .join(Plan, Plan.code == Subscription.plan_code)
            .where(Subscription.user_id == user_id)
        )
    ).first()
    if row is None:
        return Period(last_days(now, 30), None)
    sub, limit = row[0], int(row[1])
    if is_due(sub, now):
        rolled = await apply_locked(session, sub.id, now)
        if rolled is None:
            return Period(last_days(now, 30), None)
        sub = rolled
        plan = await session.get(Plan, sub.plan_code)
        limit = plan.token_limit if plan is not None else 0
    if sub.status != "active":
        return Period(last_days(now, 30), None)
    quota = Quota(
        plan=sub.plan_code,
        token_limit=limit,
        tokens_used=sub.tokens_used,
        tokens_remaining=max(limit - sub.tokens_used, 0),
        period_end=sub.current_period_end,
    )
    return Period(TimeRange(sub.current_period_start, sub.current_period_end), quota)


# --- history ----------------------------------------------------------------------------------


async def history(
    session: AsyncSession,
    user_id: uuid.UUID,
    start: Bound | None,
    end: Bound | None,
    filt: LogFilter,
    page: Page,
) -> tuple[list[UsageRecord], int]:
    """One page of the caller's settled logs, newest first, and the total matching."""
    rng = resolve(start, end, TimeRange(None, None))
    rows = (await session.execute(history_query(user_id, rng, filt, page))).mappings().all()
    items = [UsageRecord.model_validate(dict(r)) for r in rows]
    if len(items) < page.limit and (items or page.offset == 0):
        return items, page.offset + len(items)  # the last page tells its own total
    return items, await count_settled(session, user_id, rng, filt)


HistoryQuery = Select[*tuple[Any, ...]]


def history_query(user_id: uuid.UUID, rng: TimeRange, filt: LogFilter, page: Page) -> HistoryQuery:
    """The page's statement (pruned to the partitions `rng` can reach: tests EXPLAIN it)."""
    return (
        select(
            UsageLog.id,
            UsageLog.tool_id,
            Tool.name.label("tool_name"),
            UsageLog.timestamp,
            UsageLog.tokens_used,
            UsageLog.token_source,
            UsageLog.input_tokens,
            UsageLog.output_tokens,
            UsageLog.status,
            UsageLog.duration_ms,
            UsageLog.request_id,
            UsageLog.error_code,
        )
        .join(Tool, Tool.id == UsageLog.tool_id)
        .where(*_raw_window(user_id, rng.start, rng.end), *_raw_filters(filt))
        .order_by(UsageLog.timestamp.desc(), UsageLog.id.desc())
        .offset(page.offset)
        .limit(page.limit)
    )


async def count_settled(session: AsyncSession, user_id: uuid.UUID, rng: TimeRange, filt: LogFilter) -> int:
    """How many settled logs match: rollup sum for whole days, raw count for the ragged edges."""
    params = day_reads(rng).params() | {
        "user_id": user_id,
        "status": filt.status,
        "tool_id": filt.tool_id,
    }
    return int((await session.execute(_COUNT, params)).scalar_one())


# --- summary ----------------------------------------------------------------------------------


async def summary(
    session: AsyncSession,
    user_id: uuid.UUID,
    start: Bound | None,
    end: Bound | None,
    now: datetime,
    reads: AsyncSession | None = None,
) -> UsageSummary:
    """`session` (the primary) finds the period, rolling it over if due; `reads` (the read
    replica when `usage/reads.py` chose it, else the primary) answers the rollup queries."""
    period = await _current_period(session, user_id, now)
    session = reads or session
    rng = resolve(start, end, period.range)
    assert rng.start is not None and rng.end is not None
    by_tool = await _by_tool(session, user_id, rng)
    tools = sorted(
        (
            ToolUsageTokens(
                tool_id=t.tool_id,
                tool_name=t.tool_name,
                invocations=t.invocations,
                tokens=t.tokens,
                input_tokens=t.input_tokens,
                output_tokens=t.output_tokens,
            )
            for t in by_tool
        ),
        key=lambda t: (-t.invocations, t.tool_name.lower(), str(t.tool_id)),
    )
    return UsageSummary(
        period_start=rng.start,
        period_end=rng.end,
        total_invocations=sum(t.invocations for t in by_tool),
        successful_invocations=sum(t.successes for t in by_tool),
        failed_invocations=sum(t.failures for t in by_tool),
        cancelled_invocations=sum(t.cancelled for t in by_tool),
        total_tokens=sum(t.tokens for t in by_tool),
        by_tool=tools,
        quota=period.quota,
        rate_limited=await _refusals(session, user_id, rng),
    )


_REFUSALS = text(
    """
    SELECT day, SUM(rate_limited) AS refusals FROM usage_daily
    WHERE user_id = :user_id AND day >= :first AND day <= :last AND rate_limited > 0
    GROUP BY day ORDER BY day
    """
)


async def _refusals(session: AsyncSession, user_id: uuid.UUID, rng: TimeRange) -> list[DailyRefusals]:
    """Rate-limited refusals per day (the rollups count them by day: no row per refusal)."""
    assert rng.start is not None and rng.end is not None
    first = rng.start.astimezone(UTC).date()
    last = (rng.end - timedelta(microseconds=1)).astimezone(UTC).date()
    rows = await session.execute(_REFUSALS, {"user_id": user_id, "first": first, "last": last})
    return [DailyRefusals(date=day, refusals=int(n)) for day, n in rows.all()]


@dataclass(frozen=True)
class ToolTotals:
    """One tool's settled calls over a range. Each outcome is counted from its own statuses
    (`failures`: error and timeout), not as a difference, so a cancelled call is neither a
    success nor a failure; `invocations` and `tokens` count every settled call."""

    tool_id: uuid.UUID
    tool_name: str
    invocations: int
    successes: int
    failures: int
    cancelled: int
    tokens: int
    input_tokens: int = 0
    output_tokens: int = 0


async def _by_tool(session: AsyncSession, user_id: uuid.UUID, rng: TimeRange) -> list[ToolTotals]:
    rows = await session.execute(_BY_TOOL, day_reads(rng).params() | {"user_id": user_id})
    return [
        ToolTotals(tool_id, name, *(int(n) for n in (inv, ok, failed, cancelled, tok, tin, tout)))
        for tool_id, name, inv, ok, failed, cancelled, tok, tin, tout in rows.all()
        if inv
    ]


# --- timeseries -------------------------------------------------------------------------------


def _too_long(granularity: str) -> ValidationFailed:
    days = MAX_SPAN[granularity].days
    return ValidationFailed(
        details=[field_error("query.start_date", f"A {granularity} timeseries spans at most {days} days")]
    )


async def timeseries(
    session: AsyncSession,
    user_id: uuid.UUID,
    start: Bound | None,
    end: Bound | None,
    granularity: str,
    now: datetime,
    reads: AsyncSession | None = None,
) -> tuple[TimeRange, list[TimeseriesPoint]]:
    """Buckets over the range (empty ones included); a partial bucket counts its part in range.
    The period on `session` (the primary), the buckets from `reads` (as in `summary`)."""
    unit, limit = UNITS[granularity], MAX_SPAN[granularity]
    if start is None or end is None:
        default = (await _current_period(session, user_id, now)).range
    else:
        default = TimeRange(None, None)
    rng = resolve(start, end, default)
    assert rng.start is not None and rng.end is not None
    if rng.length() > limit:
        if start is not None or end is not None:
            raise _too_long(granularity)
        # the default period is longer than this granularity allows: its most recent part
        hi = max(min(rng.end, ceil_to(now, unit)), rng.start)
        rng = TimeRange(max(rng.start, hi - limit), hi)
    counts = await _bucket_counts(reads or session, user_id, rng, unit)
    empty = (0, 0)
    points = [
        TimeseriesPoint(bucket_start=b, invocations=c[0], tokens=c[1])
        for b in buckets(rng, unit)
        for c in (counts.get(b, empty),)
    ]
    return rng, points


async def _bucket_counts(
    session: AsyncSession, user_id: uuid.UUID, rng: TimeRange, unit: timedelta
) -> dict[datetime, tuple[int, int]]:
    out: dict[datetime, tuple[int, int]] = {}
    rows = await session.execute(_SERIES, series_reads(rng, unit).params() | {"user_id": user_id})
    for bucket, inv, tok in rows.all():
        if not inv:
            continue
        key = floor_to(bucket, unit)
        have = out.get(key, (0, 0))
        out[key] = (have[0] + int(inv), have[1] + int(tok))
    return out


# --- export -----------------------------------------------------------------------------------

_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """Neutralise spreadsheet formulas (CSV injection): a text cell starting with = + - @ (or a
    tab/CR) gets a leading apostrophe, so a spreadsheet shows it as text instead of running it."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_lines(rows: Sequence[Sequence[object]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows([csv_safe(v) for v in row] for row in rows)
    return buf.getvalue().encode("utf-8")


def export_range(start: Bound | None, end: Bound | None) -> TimeRange:
    return resolve(start, end, TimeRange(None, None))


def export_filename(rng: TimeRange, now: datetime) -> str:
    first = rng.start.strftime("%Y%m%d") if rng.start is not None else "all"
    last = (rng.end - timedelta(microseconds=1)) if rng.end is not None else now
    return f"usage-{first}-{last.strftime('%Y%m%d')}.csv"


async def start_export(leases: Leases, user_id: uuid.UUID, now: datetime) -> Lease:
    """One of the user's MAX_CONCURRENT_EXPORTS slots, or 429 RATE_LIMITED."""
    lease = await leases.acquire(
        f"export:{user_id}", limit=MAX_CONCURRENT_EXPORTS, ttl=EXPORT_LEASE_TTL, now=now
    )
    if lease is None:
        raise RateLimited(
            f"At most {MAX_CONCURRENT_EXPORTS} exports may run at once; try again when one has finished",
            headers={"Retry-After": str(EXPORT_RETRY_AFTER_SECONDS)},
        )
    return lease


_EXPORT_COLUMNS = (
    UsageLog.id,
    UsageLog.timestamp,
    UsageLog.tool_id,
    Tool.name,
    UsageLog.status,
    UsageLog.tokens_used,
    UsageLog.duration_ms,
    UsageLog.request_id,
    UsageLog.error_code,
    UsageLog.token_source,
    UsageLog.input_tokens,
    UsageLog.output_tokens,
)


async def export_csv(
    factory: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    rng: TimeRange,
    filt: LogFilter,
    batch: int = EXPORT_BATCH,
) -> AsyncIterator[bytes]:
    """The caller's settled logs as CSV, newest first, in keyset-paginated batches.

    Each batch is read in a session of its own that is closed (its connection back in the pool)
    before the batch is yielded to the client. (The export's lease is held by the response that
    sends this body: `usage/router.py`.)
    """
    async for chunk in export_logs_csv(
        factory, [*_raw_window(user_id, rng.start, rng.end), *_raw_filters(filt)], batch
    ):
        yield chunk


async def export_logs_csv(
    factory: async_sessionmaker[AsyncSession], where: Sequence[ColumnElement[bool]], batch: int = EXPORT_BATCH
) -> AsyncIterator[bytes]:
    """The settled logs matching `where` as CSV (see `export_csv`); also an organization's."""
    query = (
        select(*_EXPORT_COLUMNS)
        .join(Tool, Tool.id == UsageLog.tool_id)
        .where(*where)
        .order_by(UsageLog.timestamp.desc(), UsageLog.id.desc())
        .limit(batch)
    )
    yield _csv_lines([CSV_HEADER])
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        stmt = (
            query
            if after is None
            # a log settled before `after` was admitted before it too: older partitions only
            else query.where(tuple_(UsageLog.timestamp, UsageLog.id) < after, UsageLog.started_at <= after[0])
        )
        async with factory() as session:
            rows = (await session.execute(stmt)).all()
        if not rows:
            return
        yield _csv_lines([_csv_row(r) for r in rows])
        if len(rows) < batch:
            return
        after = (rows[-1][1], rows[-1][0])


def _csv_row(r: Sequence[Any]) -> tuple[object, ...]:
    return (
        str(r[0]),
        iso_utc(r[1]),
        str(r[2]),
        r[3],
        r[4],
        r[5],
        "" if r[6] is None else r[6],
        r[7] or "",
        r[8] or "",
        r[9],
        "" if r[10] is None else r[10],
        "" if r[11] is None else r[11],
    )

"""An organization's usage (API.md §13 with §6's shapes): history, summary with a per-member
breakdown, timeseries and export.

Admins and owners see every member's calls (and may filter by `user_id`); a member sees their
own. Summaries and daily series read the `usage_org_daily` rollup for whole UTC days and the raw
logs (index `(org_id, timestamp)`) only for the ragged edges, as the personal ones do; hourly
series (at most 31 days) read the raw logs of that window.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core.pagination import Page
from joyhub.models import Plan, Tool, UsageLog
from joyhub.orgs.schemas import MemberUsage, OrgUsageSummary
from joyhub.subscriptions.rollover import ensure_current
from joyhub.usage import service as usage
from joyhub.usage.dates import HOUR, Bound, TimeRange, buckets, floor_to, resolve
from joyhub.usage.schemas import DailyRefusals, Quota, TimeseriesPoint, ToolUsageTokens, UsageRecord
from joyhub.usage.service import _SETTLED_SQL, MAX_SPAN, UNITS, LogFilter, day_reads, last_days

_IS_SETTLED = UsageLog.status.in_(usage.SETTLED)


@dataclass(frozen=True)
class Scope:
    """Whose calls: the organization's, optionally one member's."""

    org_id: uuid.UUID
    user_id: uuid.UUID | None = None

    def params(self) -> dict[str, object]:
        return {"org_id": self.org_id, "member": self.user_id}

    def raw(self, rng: TimeRange) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = [UsageLog.org_id == self.org_id, _IS_SETTLED]
        if self.user_id is not None:
            conds.append(UsageLog.user_id == self.user_id)
        if rng.start is not None:
            conds.append(UsageLog.timestamp >= rng.start)
        if rng.end is not None:
            conds.append(UsageLog.timestamp < rng.end)
        return conds


async def _period(session: AsyncSession, org_id: uuid.UUID, now: datetime) -> tuple[TimeRange, Quota | None]:
    sub = await ensure_current(session, None, now, org_id=org_id)
    if sub is None or sub.status != "active":
        return last_days(now, 30), None
    plan = await session.get(Plan, sub.plan_code)
    limit = plan.token_limit if plan is not None else 0
    quota = Quota(
        plan=sub.plan_code,
        token_limit=limit,
        tokens_used=sub.tokens_used,
        tokens_remaining=max(limit - sub.tokens_used, 0),
        period_end=sub.current_period_end,
    )
    return TimeRange(sub.current_period_start, sub.current_period_end), quota


async def history(
    session: AsyncSession, scope: Scope, start: Bound | None, end: Bound | None, filt: LogFilter, page: Page
) -> tuple[list[UsageRecord], int]:
    rng = resolve(start, end, TimeRange(None, None))
    conds = scope.raw(rng)
    if filt.tool_id is not None:
        conds.append(UsageLog.tool_id == filt.tool_id)
    if filt.status is not None:
        conds.append(UsageLog.status == filt.status)
    rows = (
        await session.execute(
            select(
                UsageLog.id,
                UsageLog.tool_id,
                Tool.name.label("tool_name"),
                UsageLog.timestamp,
                UsageLog.tokens_used,
                UsageLog.token_source,
                UsageLog.status,
                UsageLog.duration_ms,
                UsageLog.request_id,
                UsageLog.error_code,
            )
            .join(Tool, Tool.id == UsageLog.tool_id)
            .where(*conds)
            .order_by(UsageLog.timestamp.desc(), UsageLog.id.desc())
            .offset(page.offset)
            .limit(page.limit)
        )
    ).mappings()
    items = [UsageRecord.model_validate(dict(r)) for r in rows]
    if len(items) < page.limit and (items or page.offset == 0):
        return items, page.offset + len(items)
    total = (await session.execute(select(func.count()).select_from(UsageLog).where(*conds))).scalar_one()
    return items, int(total)


# by tool and member: whole days from the rollup, the ragged edges from the raw logs (as the
# personal `_BY_TOOL`); a rollup row with no invocations holds only refusals (`metering._ADMIT`)
# and is left out, so a tool or member is listed only for calls that were made
_BY_TOOL_MEMBER = text(
    f"""
    SELECT x.tool_id, t.name, x.user_id, u.email, CAST(sum(x.inv) AS bigint), CAST(sum(x.ok) AS bigint),
           CAST(sum(x.failed) AS bigint), CAST(sum(x.cancelled) AS bigint),
           CAST(coalesce(sum(x.tok), 0) AS bigint), CAST(coalesce(sum(x.tin), 0) AS bigint),
           CAST(coalesce(sum(x.tout), 0) AS bigint)
    FROM (
        SELECT tool_id, user_id, sum(invocations) AS inv, sum(successes) AS ok,
               sum(errors + timeouts) AS failed, sum(cancelled) AS cancelled, sum(tokens) AS tok,
               sum(input_tokens) AS tin, sum(output_tokens) AS tout
        FROM usage_org_daily
        WHERE org_id = :org_id AND (CAST(:member AS uuid) IS NULL OR user_id = CAST(:member AS uuid))
          AND day >= :d0 AND day < :d1
        GROUP BY tool_id, user_id
        UNION ALL
        SELECT tool_id, user_id, count(*), count(*) FILTER (WHERE status = 'success'),
               count(*) FILTER (WHERE status IN ('error', 'timeout')),
               count(*) FILTER (WHERE status = 'cancelled'), sum(tokens_used), sum(input_tokens),
               sum(output_tokens)
        FROM usage_logs
        WHERE org_id = :org_id AND (CAST(:member AS uuid) IS NULL OR user_id = CAST(:member AS uuid))
          AND status IN ({_SETTLED_SQL}) AND started_at >= :s_lo AND started_at < :s_hi
          AND (("timestamp" >= :r1a AND "timestamp" < :r1b) OR ("timestamp" >= :r2a AND "timestamp" < :r2b))
        GROUP BY tool_id, user_id
    ) AS x
    JOIN tools AS t ON t.id = x.tool_id
    JOIN users AS u ON u.id = x.user_id
    GROUP BY x.tool_id, t.name, x.user_id, u.email
    HAVING sum(x.inv) > 0
    """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
)


@dataclass
class _Tally:
    """One tool's (or member's) running sums while the rows are added up."""

    name: str
    invocations: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


async def summary(
    session: AsyncSession,
    scope: Scope,
    start: Bound | None,
    end: Bound | None,
    now: datetime,
    *,
    by_member: bool,
) -> OrgUsageSummary:
    """The scope's summary with §6's shape (per-tool prompt/completion tokens, refusals per day),
    so a client reads an organization's usage exactly as its own; `by_member` for admins."""
    period, quota = await _period(session, scope.org_id, now)
    rng = resolve(start, end, period)
    assert rng.start is not None and rng.end is not None
    rows = (await session.execute(_BY_TOOL_MEMBER, day_reads(rng).params() | scope.params())).all()
    tools: dict[uuid.UUID, _Tally] = {}
    members: dict[uuid.UUID, _Tally] = {}
    totals = [0, 0, 0, 0, 0]  # invocations, successes, failures, cancelled, tokens
    for tool_id, tool_name, user_id, email, inv, ok, failed, cancelled, tok, tin, tout in rows:
        t = tools.setdefault(tool_id, _Tally(str(tool_name)))
        t.invocations += int(inv)
        t.tokens += int(tok)
        t.input_tokens += int(tin)
        t.output_tokens += int(tout)
        mm = members.setdefault(user_id, _Tally(str(email)))
        mm.invocations += int(inv)
        mm.tokens += int(tok)
        for i, v in enumerate((inv, ok, failed, cancelled, tok)):
            totals[i] += int(v)
    by_tool = sorted(
        (
            ToolUsageTokens(
                tool_id=k,
                tool_name=v.name,
                invocations=v.invocations,
                tokens=v.tokens,
                input_tokens=v.input_tokens,
                output_tokens=v.output_tokens,
            )
            for k, v in tools.items()
        ),
        key=lambda t: (-t.invocations, t.tool_name.lower(), str(t.tool_id)),
    )
    member_rows = sorted(
        (
            MemberUsage(user_id=k, email=v.name, invocations=v.invocations, tokens=v.tokens)
            for k, v in members.items()
        ),
        key=lambda m: (-m.tokens, m.email),
    )
    return OrgUsageSummary(
        period_start=rng.start,
        period_end=rng.end,
        total_invocations=totals[0],
        successful_invocations=totals[1],
        failed_invocations=totals[2],
        cancelled_invocations=totals[3],
        total_tokens=totals[4],
        by_tool=by_tool,
        quota=quota,
        by_member=member_rows if by_member else None,
        rate_limited=await _refusals(session, scope, rng),
    )


# refusals leave no usage log: they are read from the rollup only, whole days (as the personal ones)
_REFUSALS = text(
    """
    SELECT day, SUM(rate_limited) AS refusals FROM usage_org_daily
    WHERE org_id = :org_id AND (CAST(:member AS uuid) IS NULL OR user_id = CAST(:member AS uuid))
      AND day >= :first AND day <= :last AND rate_limited > 0
    GROUP BY day ORDER BY day
    """
)


async def _refusals(session: AsyncSession, scope: Scope, rng: TimeRange) -> list[DailyRefusals]:
    """The scope's rate-limited refusals per UTC day of the range (counted by day at admission,
    `metering._ADMIT`: a partial first or last day counts whole, as in the personal summary)."""
    assert rng.start is not None and rng.end is not None
    first = rng.start.astimezone(UTC).date()
    last = (rng.end - timedelta(microseconds=1)).astimezone(UTC).date()
    rows = await session.execute(_REFUSALS, scope.params() | {"first": first, "last": last})
    return [DailyRefusals(date=day, refusals=int(n)) for day, n in rows.all()]


_SERIES_DAYS = text(
    """
    SELECT CAST(day AS timestamp) AT TIME ZONE 'UTC', sum(invocations), sum(tokens)
    FROM usage_org_daily
    WHERE org_id = :org_id AND (CAST(:member AS uuid) IS NULL OR user_id = CAST(:member AS uuid))
      AND day >= :d0 AND day < :d1
    GROUP BY day
    """
)

_SERIES_RAW = text(
    f"""
    SELECT date_trunc('hour', "timestamp" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', count(*),
           coalesce(sum(tokens_used), 0)
    FROM usage_logs
    WHERE org_id = :org_id AND (CAST(:member AS uuid) IS NULL OR user_id = CAST(:member AS uuid))
      AND status IN ({_SETTLED_SQL}) AND started_at >= :s_lo AND started_at < :s_hi
      AND (("timestamp" >= :r1a AND "timestamp" < :r1b) OR ("timestamp" >= :r2a AND "timestamp" < :r2b))
    GROUP BY 1
    """  # noqa: S608 (constant SQL pieces joined at import; every value is a bound parameter)
)


async def timeseries(
    session: AsyncSession,
    scope: Scope,
    start: Bound | None,
    end: Bound | None,
    granularity: str,
    now: datetime,
) -> list[TimeseriesPoint]:
    unit, limit = UNITS[granularity], MAX_SPAN[granularity]
    default = (
        (await _period(session, scope.org_id, now))[0]
        if start is None or end is None
        else TimeRange(None, None)
    )
    rng = resolve(start, end, default)
    assert rng.start is not None and rng.end is not None
    if rng.length() > limit:
        if start is not None or end is not None:
            raise usage._too_long(granularity)
        rng = TimeRange(max(rng.start, rng.end - limit), rng.end)
    if unit == HOUR:  # at most 31 days of raw rows, through the (org_id, timestamp) index
        lo, hi = rng.start, rng.end
        assert lo is not None and hi is not None
        params = usage.Reads(raw=((lo, hi), (usage.NOTHING, usage.NOTHING))).params()
        rows = list((await session.execute(_SERIES_RAW, params | scope.params())).all())
    else:
        params = day_reads(rng).params()
        rows = list((await session.execute(_SERIES_DAYS, params | scope.params())).all())
        rows += list((await session.execute(_SERIES_RAW, params | scope.params())).all())
    counts: dict[datetime, tuple[int, int]] = {}
    for bucket, inv, tok in rows:
        key = floor_to(bucket, unit)
        have = counts.get(key, (0, 0))
        counts[key] = (have[0] + int(inv), have[1] + int(tok))
    return [
        TimeseriesPoint(bucket_start=b, invocations=c[0], tokens=c[1])
        for b in buckets(rng, unit)
        for c in (counts.get(b, (0, 0)),)
    ]


def export(
    factory: async_sessionmaker[AsyncSession], scope: Scope, rng: TimeRange, filt: LogFilter
) -> AsyncIterator[bytes]:
    conds = scope.raw(rng)
    if filt.tool_id is not None:
        conds.append(UsageLog.tool_id == filt.tool_id)
    if filt.status is not None:
        conds.append(UsageLog.status == filt.status)
    return usage.export_logs_csv(factory, conds)

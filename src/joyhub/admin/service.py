"""The admin console's rules for users, platform stats and the audit log (API.md §7).

Users
- The list and the detail are one query each: the user row, its subscription and plan joined,
  the count of its usable API keys as a correlated subquery on `(user_id, …)` — no N+1. The
  subscription is shown *as of now*: a row whose period has run out is rolled forward in memory
  by the rollover rule (`rollover.advance` on a detached copy), so a GET never writes and never
  shows last period's counters.
- `PATCH` locks before it decides. When the change would take an active admin out of the set
  of active admins (demotion or disabling), every active admin row is locked
  (`SELECT … FOR UPDATE`, in id order, so two such requests cannot deadlock) *before* the
  target row, then the set is counted: if the target is the last one, 409 `CONFLICT`. Two admins
  demoting each other at once therefore serialise on those locks and the second sees one admin
  left. A caller who is no longer an active admin once the locks are held gets 403.
- Disabling revokes every live session of the user (`revoke_reason = 'disabled'`); access tokens
  die with their session and API keys stop at once because the principal check reads
  `users.is_active`. Every change is audited as `user.update` with a before/after diff.

Platform stats
- Over whole UTC days (timestamps are widened to the days that contain them; at most 366
  days), from the rollups only: `usage_platform_daily` (a few thousand rows per month) for the
  totals, status, tool, plan and daily figures; for active users and the top ten, one aggregate
  per user over `usage_user_weekly` for the whole weeks (Monday-Sunday) inside the range and
  `usage_user_daily` for the at most 12 ragged days at its ends. Cost: O(days x tools x plans x
  16) plus O(active users x (weeks + edge days)); never the raw logs.
- A `cancelled` call (the caller hung up mid-stream, charged for what was relayed) is a settled
  call like the others: in every total, tool, plan, user and daily figure, and in
  `by_status.cancelled`, so the four statuses add up to `total_invocations`.
- Subscriptions are counted as stored (the periodic sweep keeps them current within a sweep
  interval): `by_status` counts every subscription row by status; `by_plan` counts *active*
  subscriptions per plan (every plan listed, zeros included). Monthly recurring revenue is the
  sum over active subscriptions that will renew (not `cancel_at_period_end`) of the plan's price
  normalised to 30 days (`price_cents * 30 / period_days`, rounded once at the end), in the
  plans' currency; a subscription set to cancel is revenue of this period, not recurring.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Numeric,
    Select,
    and_,
    case,
    cast,
    func,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit
from joyhub.core.errors import Conflict, Forbidden, NotFound, ValidationFailed, field_error
from joyhub.core.pagination import Page
from joyhub.models import (
    ApiKey,
    AuditLog,
    AuthSession,
    Plan,
    Subscription,
    Tool,
    UsagePlatformDaily,
    UsageUserDaily,
    UsageUserWeekly,
    User,
)
from joyhub.subscriptions.rollover import advance
from joyhub.usage.dates import DAY, Bound, TimeRange, ceil_to, floor_to, resolve
from joyhub.usage.schemas import DailyRefusals, ToolUsage
from joyhub.usage.service import last_days

from .schemas import (
    AdminSubscription,
    AdminUserOut,
    AdminUserUpdate,
    AuditEntry,
    DailyUsage,
    PlanUsage,
    PlatformStats,
    StatusCounts,
    SubscriptionStats,
    TopUser,
)

MAX_STATS_SPAN = timedelta(days=366)
TOP_USERS = 10

# --- users ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserFilter:
    search: str | None = None
    role: str | None = None
    is_active: bool | None = None


def _like_pattern(term: str) -> str:
    """`%term%` with the LIKE wildcards of the term itself escaped (backslash is the escape)."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _users_query(now: datetime) -> Select[Any]:
    active_keys = (
        select(func.count())
        .where(
            ApiKey.user_id == User.id,
            ApiKey.is_active.is_(True),
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
        )
        .correlate(User)
        .scalar_subquery()
    )
    return select(User, Subscription, active_keys.label("api_key_count")).outerjoin(
        Subscription, Subscription.user_id == User.id
    )


def _user_conditions(filt: UserFilter) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    if filt.search:
        pattern = _like_pattern(filt.search)
        matches: list[ColumnElement[bool]] = [
            User.name.ilike(pattern, escape="\\"),
            User.email.ilike(pattern, escape="\\"),
        ]
        with contextlib.suppress(ValueError):  # an operator pasting a user id finds that user too
            matches.append(User.id == uuid.UUID(filt.search))
        conds.append(or_(*matches))
    if filt.role is not None:
        conds.append(User.role == filt.role)
    if filt.is_active is not None:
        conds.append(User.is_active.is_(filt.is_active))
    return conds


def _subscription_view(
    sub: Subscription | None, plans: dict[str, Plan], now: datetime
) -> AdminSubscription | None:
    """The subscription as of `now`, without writing: a detached copy rolled forward if due."""
    if sub is None:
        return None
    view = Subscription(
        plan_code=sub.plan_code,
        status=sub.status,
        tokens_used=sub.tokens_used,
        current_period_start=sub.current_period_start,
        current_period_end=sub.current_period_end,
        cancel_at_period_end=sub.cancel_at_period_end,
        scheduled_plan_code=sub.scheduled_plan_code,
        expires_at=sub.expires_at,
    )
    advance(view, plans, now)
    plan = plans.get(view.plan_code)
    return AdminSubscription(
        plan=view.plan_code,
        status=view.status,  # type: ignore[arg-type]
        tokens_used=view.tokens_used,
        token_limit=plan.token_limit if plan is not None else 0,
        current_period_end=view.current_period_end,
    )


async def _plans(session: AsyncSession) -> dict[str, Plan]:
    return {p.code: p for p in (await session.execute(select(Plan))).scalars()}


def _admin_user(row: Any, plans: dict[str, Plan], now: datetime) -> AdminUserOut:
    user: User = row[0]
    return AdminUserOut(
        id=user.id,
        name=user.name,
        email=user.email,
        role=user.role,  # type: ignore[arg-type]
        is_active=user.is_active,
        created_at=user.created_at,
        updated_at=user.updated_at,
        subscription=_subscription_view(row[1], plans, now),
        last_login_at=user.last_login_at,
        api_key_count=int(row[2] or 0),
    )


async def list_users(
    session: AsyncSession, filt: UserFilter, page: Page, now: datetime
) -> tuple[list[AdminUserOut], int]:
    """Users newest first, each with its subscription, last login and usable key count."""
    conds = _user_conditions(filt)
    plans = await _plans(session)
    stmt = (
        _users_query(now)
        .where(*conds)
        .order_by(User.created_at.desc(), User.id.desc())
        .offset(page.offset)
        .limit(page.limit)
    )
    rows = (await session.execute(stmt)).all()
    items = [_admin_user(r, plans, now) for r in rows]
    if len(items) < page.limit and (items or page.offset == 0):
        return items, page.offset + len(items)
    total = (await session.execute(select(func.count()).select_from(User).where(*conds))).scalar_one()
    return items, int(total)


async def get_user(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> AdminUserOut:
    row = (await session.execute(_users_query(now).where(User.id == user_id))).first()
    if row is None:
        raise NotFound("No such user")
    return _admin_user(row, await _plans(session), now)


def _snapshot(user: User) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "is_active": user.is_active}


async def update_user(
    session: AsyncSession, actor: User, user_id: uuid.UUID, changes: AdminUserUpdate, now: datetime
) -> AdminUserOut:
    """Apply a PATCH under the last-admin rule; disabling revokes every session. Audited."""
    fields = changes.model_dump(exclude_unset=True)
    target = await session.get(User, user_id)
    if target is None:
        raise NotFound("No such user")

    def removes_admin(user: User) -> bool:
        return (
            user.role == "admin"
            and user.is_active
            and (fields.get("role", user.role) != "admin" or not fields.get("is_active", user.is_active))
        )

    admins: Sequence[uuid.UUID] = ()
    if removes_admin(target):
        # lock the whole set of active admins first (id order: no deadlock between two such calls)
        admins = (
            (
                await session.execute(
                    select(User.id)
                    .where(User.role == "admin", User.is_active.is_(True))
                    .order_by(User.id)
                    .with_for_update()
                )
            )
            .scalars()
            .all()
        )
        if actor.id not in admins:
            raise Forbidden("Administrator role required")
    target = (
        await session.execute(
            select(User).where(User.id == user_id).with_for_update().execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if target is None:
        raise NotFound("No such user")
    if removes_admin(target) and len(admins) <= 1:
        what = "demote" if fields.get("role", "admin") != "admin" else "disable"
        raise Conflict(f"Cannot {what} the last active admin")

    before = _snapshot(target)
    for key, value in fields.items():
        setattr(target, key, value)
    after = _snapshot(target)
    diff = audit.diff(before, after)
    if diff:
        target.updated_at = now
        extra: dict[str, Any] = {}
        if before["is_active"] and not after["is_active"]:
            revoked = await session.execute(
                update(AuthSession)
                .where(AuthSession.user_id == target.id, AuthSession.revoked_at.is_(None))
                .values(revoked_at=now, revoke_reason="disabled")
                .execution_options(synchronize_session=False)
            )
            extra["sessions_revoked"] = revoked.rowcount  # type: ignore[attr-defined]
        await session.flush()
        audit.record(
            session,
            actor=actor,
            action="user.update",
            target_type="user",
            target_id=target.id,
            changes=diff | extra,
        )
        await session.flush()
    return await get_user(session, target.id, now)


# --- platform stats ---------------------------------------------------------------------------


def stats_range(start: Bound | None, end: Bound | None, now: datetime) -> TimeRange:
    """Whole UTC days covering the request (default: the last 30 days, today included)."""
    rng = resolve(start, end, last_days(now, 30))
    assert rng.start is not None and rng.end is not None
    widened = TimeRange(floor_to(rng.start, DAY), max(ceil_to(rng.end, DAY), floor_to(rng.start, DAY)))
    if widened.length() > MAX_STATS_SPAN:
        raise ValidationFailed(
            details=[field_error("query.start_date", "Platform stats span at most 366 days")]
        )
    return widened


def _days(rng: TimeRange) -> tuple[date, date]:
    assert rng.start is not None and rng.end is not None
    return rng.start.date(), rng.end.date()


def _big(expr: ColumnElement[Any]) -> ColumnElement[int]:
    return cast(func.coalesce(expr, 0), BigInteger)


async def platform_stats(
    session: AsyncSession, start: Bound | None, end: Bound | None, now: datetime
) -> PlatformStats:
    rng = stats_range(start, end, now)
    first, stop = _days(rng)
    usage = await _usage_breakdown(session, first, stop)
    top, active = await _top_users(session, first, stop)
    daily_counts = usage["day"]
    daily = []
    refusals: list[DailyRefusals] = []
    cursor = first
    while cursor < stop:
        inv, tok, limited = daily_counts.get(cursor, (0, 0, 0))
        daily.append(DailyUsage(date=cursor, invocations=inv, tokens=tok))
        if limited:
            refusals.append(DailyRefusals(date=cursor, refusals=limited))
        cursor += timedelta(days=1)
    totals = usage["totals"]
    assert rng.start is not None and rng.end is not None
    return PlatformStats(
        period_start=rng.start,
        period_end=rng.end,
        total_invocations=totals["invocations"],
        total_tokens=totals["tokens"],
        active_users=active,
        by_status=StatusCounts(
            success=totals["successes"],
            error=totals["errors"],
            timeout=totals["timeouts"],
            cancelled=totals["cancelled"],
        ),
        by_tool=usage["tools"],
        by_plan=usage["plans"],
        top_users=top,
        daily=daily,
        rate_limited=refusals,
        subscriptions=await _subscription_stats(session),
    )


async def _usage_breakdown(session: AsyncSession, first: date, stop: date) -> dict[str, Any]:
    """One pass over `usage_platform_daily` with GROUPING SETS: per day, per tool, per plan."""
    p = UsagePlatformDaily
    g = func.grouping(p.day, p.tool_id, p.plan_code)
    stmt = (
        select(
            g.label("g"),
            p.day,
            p.tool_id,
            p.plan_code,
            _big(func.sum(p.invocations)),
            _big(func.sum(p.successes)),
            _big(func.sum(p.errors)),
            _big(func.sum(p.timeouts)),
            _big(func.sum(p.cancelled)),
            _big(func.sum(p.tokens)),
            _big(func.sum(p.rate_limited)),
        )
        .where(p.day >= first, p.day < stop)
        .group_by(func.grouping_sets(tuple_(p.day), tuple_(p.tool_id), tuple_(p.plan_code)))
    )
    days: dict[date, tuple[int, int, int]] = {}
    tools: dict[uuid.UUID, tuple[int, int]] = {}
    plans: list[PlanUsage] = []
    totals = dict.fromkeys(
        ("invocations", "successes", "errors", "timeouts", "cancelled", "tokens", "rate_limited"), 0
    )
    rows = (await session.execute(stmt)).all()
    for grouping, day, tool_id, plan_code, inv, ok, err, tmo, cxl, tok, limited in rows:
        if grouping == 0b011:  # grouped by day only
            days[day] = (int(inv), int(tok), int(limited))
            totals["invocations"] += int(inv)
            totals["successes"] += int(ok)
            totals["errors"] += int(err)
            totals["timeouts"] += int(tmo)
            totals["cancelled"] += int(cxl)
            totals["tokens"] += int(tok)
        elif not inv:  # a tool or plan with refusals only (rate limits): no calls to show
            continue
        elif grouping == 0b101:  # by tool
            tools[tool_id] = (int(inv), int(tok))
        elif grouping == 0b110:  # by plan ('' = no plan)
            plans.append(PlanUsage(plan=plan_code or None, invocations=int(inv), tokens=int(tok)))
    names = await _tool_names(session, list(tools))
    by_tool = sorted(
        (
            ToolUsage(tool_id=t, tool_name=names.get(t, ""), invocations=inv, tokens=tok)
            for t, (inv, tok) in tools.items()
        ),
        key=lambda x: (-x.invocations, x.tool_name.lower(), str(x.tool_id)),
    )
    plans.sort(key=lambda x: (-x.invocations, x.plan or ""))
    return {"day": days, "tools": by_tool, "plans": plans, "totals": totals}


async def _tool_names(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not ids:
        return {}
    rows = await session.execute(select(Tool.id, Tool.name).where(Tool.id.in_(ids)))
    return {tool_id: name for tool_id, name in rows.all()}


def week_cut(first: date, stop: date) -> tuple[date, date] | None:
    """The whole weeks (Monday to Sunday) inside the days `[first, stop)`, as `[monday, monday)`,
    or None when no whole week fits."""
    lo = first + timedelta(days=(7 - first.weekday()) % 7)
    hi = stop - timedelta(days=stop.weekday())
    return (lo, hi) if lo < hi else None


async def _top_users(session: AsyncSession, first: date, stop: date) -> tuple[list[TopUser], int]:
    """The ten busiest users (by invocations, then tokens) and how many were active at all.

    One aggregate per user over whole weeks from `usage_user_weekly` plus the ragged days at
    both ends from `usage_user_daily`; the window count is taken before the LIMIT."""
    d, w = UsageUserDaily, UsageUserWeekly
    weeks = week_cut(first, stop)
    if weeks is None:
        parts: list[Select[uuid.UUID, int, int]] = [
            select(d.user_id, d.invocations, d.tokens).where(d.day >= first, d.day < stop)
        ]
    else:
        parts = [
            select(w.user_id, w.invocations, w.tokens).where(w.week >= weeks[0], w.week < weeks[1]),
            select(d.user_id, d.invocations, d.tokens).where(
                or_(and_(d.day >= first, d.day < weeks[0]), and_(d.day >= weeks[1], d.day < stop))
            ),
        ]
    blocks = union_all(*parts).subquery()
    inv = _big(func.sum(blocks.c.invocations)).label("inv")
    tok = _big(func.sum(blocks.c.tokens)).label("tok")
    per_user = (
        select(blocks.c.user_id, inv, tok, func.count().over().label("active"))
        .group_by(blocks.c.user_id)
        .order_by(inv.desc(), tok.desc(), blocks.c.user_id)
        .limit(TOP_USERS)
        .subquery()
    )
    stmt = (
        select(per_user.c.user_id, User.email, per_user.c.inv, per_user.c.tok, per_user.c.active)
        .join(User, User.id == per_user.c.user_id)
        .order_by(per_user.c.inv.desc(), per_user.c.tok.desc(), per_user.c.user_id)
    )
    rows = (await session.execute(stmt)).all()
    top = [TopUser(user_id=r[0], email=r[1], invocations=int(r[2]), tokens=int(r[3])) for r in rows]
    return top, int(rows[0][4]) if rows else 0


async def _subscription_stats(session: AsyncSession) -> SubscriptionStats:
    renewing = and_(Subscription.status == "active", Subscription.cancel_at_period_end.is_(False))
    monthly = cast(Plan.price_cents, Numeric) * 30 / Plan.period_days
    stmt = (
        select(
            Subscription.plan_code,
            Subscription.status,
            func.count(),
            func.coalesce(func.sum(case((renewing, monthly), else_=0)), 0),
        )
        .join(Plan, Plan.code == Subscription.plan_code)
        .group_by(Subscription.plan_code, Subscription.status)
    )
    plans = (await session.execute(select(Plan.code, Plan.currency).order_by(Plan.rank))).all()
    by_plan = {code: 0 for code, _currency in plans}
    by_status = {"active": 0, "cancelled": 0, "expired": 0}
    mrr = 0.0
    for plan_code, status, count, revenue in (await session.execute(stmt)).all():
        by_status[status] = by_status.get(status, 0) + int(count)
        if status == "active":
            by_plan[plan_code] = by_plan.get(plan_code, 0) + int(count)
        mrr += float(revenue)
    return SubscriptionStats(
        by_plan=by_plan,
        by_status=by_status,
        monthly_recurring_revenue_cents=round(mrr),
        currency=plans[0][1] if plans else "USD",
    )


# --- audit log --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    actor_id: uuid.UUID | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None


async def list_audit(session: AsyncSession, filt: AuditFilter, page: Page) -> tuple[list[AuditEntry], int]:
    """Audit entries newest first (`created_at`, then id), filtered; total counted alongside."""
    conds: list[ColumnElement[bool]] = []
    if filt.actor_id is not None:
        conds.append(AuditLog.actor_id == filt.actor_id)
    if filt.action is not None:
        conds.append(AuditLog.action == filt.action)
    if filt.target_type is not None:
        conds.append(AuditLog.target_type == filt.target_type)
    if filt.target_id is not None:
        conds.append(AuditLog.target_id == filt.target_id)
    stmt = (
        select(AuditLog)
        .where(*conds)
        .order_by(AuditLog.created_at.desc(), AuditLog.id.desc())
        .offset(page.offset)
        .limit(page.limit)
    )
    rows = (await session.execute(stmt)).scalars().all()
    items = [
        AuditEntry(
            id=r.id,
            actor_id=r.actor_id,
            actor_email=r.actor_email,
            action=r.action,
            target_type=r.target_type,
            target_id=r.target_id,
            changes=r.changes,
            request_id=r.request_id,
            created_at=r.created_at,
        )
        for r in rows
    ]
    if len(items) < page.limit and (items or page.offset == 0):
        return items, page.offset + len(items)
    total = (await session.execute(select(func.count()).select_from(AuditLog).where(*conds))).scalar_one()
    return items, int(total)

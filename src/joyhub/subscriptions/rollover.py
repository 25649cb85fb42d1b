"""Period rollover (API.md §4): the one rule for what time does to a subscription.

`advance` is pure: given a subscription, the plans and "now", it moves the row forward —
catching up several missed periods at once, applying a scheduled downgrade, a pending
cancellation, or a past `expires_at` — and says what happened. `ensure_current` applies it
race-free: a cheap unlocked read first, and only when something is due a `SELECT … FOR UPDATE`
and a re-check, so many requests and workers racing on one subscription roll it over once.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit
from joyhub.models import Plan, Subscription


def is_due(sub: Subscription, now: datetime) -> bool:
    """Whether time has changed anything for this subscription."""
    if sub.status != "active":
        return False
    if sub.expires_at is not None and sub.expires_at <= now:
        return True
    return now >= sub.current_period_end


def advance(sub: Subscription, plans: dict[str, Plan], now: datetime) -> str | None:
    """Move `sub` forward to `now`; return the audit action for what changed, or None."""
    if not is_due(sub, now):
        return None
    if sub.expires_at is not None and sub.expires_at <= now:
        sub.status = "expired"
        sub.cancel_at_period_end = False
        sub.scheduled_plan_code = None
        return "subscription.expire"
    if sub.cancel_at_period_end:
        sub.status = "cancelled"
        sub.cancel_at_period_end = False
        sub.scheduled_plan_code = None
        return "subscription.cancelled"
    action = "subscription.renew"
    if sub.scheduled_plan_code:
        sub.plan_code = sub.scheduled_plan_code
        sub.scheduled_plan_code = None
        action = "subscription.downgrade_applied"
    period = timedelta(days=plans[sub.plan_code].period_days)
    start = sub.current_period_end
    missed = (now - start) // period  # whole periods that passed unseen
    start = start + missed * period
    sub.current_period_start = start
    sub.current_period_end = start + period
    sub.tokens_used = 0
    return action


async def _plans(session: AsyncSession) -> dict[str, Plan]:
    return {p.code: p for p in (await session.execute(select(Plan))).scalars()}


async def apply_locked(session: AsyncSession, sub_id: uuid.UUID, now: datetime) -> Subscription | None:
    """Lock the row, re-check and roll it forward; write the audit entry in this transaction."""
    sub = (
        await session.execute(
            select(Subscription)
            .where(Subscription.id == sub_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if sub is None or not is_due(sub, now):
        return sub
    before = snapshot(sub)
    action = advance(sub, await _plans(session), now)
    if action:
        sub.updated_at = now
        await session.flush()
        audit.record(
            session,
            actor=None,
            action=action,
            target_type="subscription",
            target_id=sub.id,
            changes=audit.diff(before, snapshot(sub)) | {"user_id": str(sub.user_id)},
        )
    return sub


async def ensure_current(session: AsyncSession, user_id: uuid.UUID, now: datetime) -> Subscription | None:
    """The user's subscription as of `now` (rolled over if due), or None if they never had one."""
    sub = (
        await session.execute(select(Subscription).where(Subscription.user_id == user_id))
    ).scalar_one_or_none()
    if sub is None or not is_due(sub, now):
        return sub
    return await apply_locked(session, sub.id, now)


def snapshot(sub: Subscription) -> dict[str, object]:
    """The audited fields of a subscription, as plain values."""
    return {
        "plan": sub.plan_code,
        "status": sub.status,
        "tokens_used": sub.tokens_used,
        "current_period_start": sub.current_period_start.isoformat(),
        "current_period_end": sub.current_period_end.isoformat(),
        "cancel_at_period_end": sub.cancel_at_period_end,
        "scheduled_plan": sub.scheduled_plan_code,
        "expires_at": sub.expires_at.isoformat() if sub.expires_at else None,
    }

"""Period rollover (API.md §4): the one rule for what time does to a subscription.

`advance` is pure: given a subscription, the plans and "now", it moves the row forward —
catching up several missed periods at once, applying a scheduled downgrade, a pending
cancellation, or a past `expires_at` — and says what happened. Everything else here applies it
race-free, always on a row held with `SELECT … FOR UPDATE` and re-checked after the lock, so
many requests, workers and sweepers racing on one subscription roll it over exactly once:

- `ensure_current` (every read and every invocation): a cheap unlocked read first, and only
  when something is due the lock and the re-check (`apply_locked`).
- `sweep_due` (the periodic sweep and `joyhub sweep`): due rows in batches with
  `FOR UPDATE SKIP LOCKED`, each batch in its own short transaction, so several sweepers share
  the work and a request never waits on a long sweep.

Renewal is where a payment provider would charge for the next period (see `service`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.core import audit
from joyhub.core.config import Settings
from joyhub.models import Plan, Subscription
from joyhub.subscriptions import notify

SWEEP_BATCH_SIZE = 200
_TICK = timedelta(microseconds=1)  # PostgreSQL's timestamp resolution


class Dated(Protocol):
    """What the rollover rule looks at: a subscription row, or the gateway's read of one."""

    @property
    def status(self) -> str: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def current_period_end(self) -> datetime: ...


def is_due(sub: Dated, now: datetime) -> bool:
    """Whether time has changed anything for this subscription."""
    if sub.status != "active":
        return False
    if sub.expires_at is not None and sub.expires_at <= now:
        return True
    return now >= sub.current_period_end


def advance(sub: Subscription, plans: dict[str, Plan], now: datetime) -> str | None:
    """Move `sub` forward to `now`; return the audit action for what changed, or None.

    Events are taken in time order. Each period boundary reached strictly before `expires_at`
    (and at or before `now`) is a renewal — or the end, when a cancellation is pending; a
    scheduled downgrade applies at the first boundary and later periods use the new plan's
    length. Then a past `expires_at` ends the subscription. A boundary at the very instant of
    expiry is not a renewal (nothing to renew into). When several things happened, the action
    names the last (`expire` after renewals); the diff shows them all.
    """
    if not is_due(sub, now):
        return None
    expires_at = sub.expires_at
    action: str | None = None
    end = sub.current_period_end
    if end <= now and (expires_at is None or end < expires_at):
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
        # the last boundary reached: at or before now, and strictly before the expiry
        horizon = now if expires_at is None or expires_at > now else expires_at - _TICK
        missed = (horizon - end) // period  # whole periods that passed unseen
        start = end + missed * period
        sub.current_period_start = start
        sub.current_period_end = start + period
        sub.tokens_used = 0
    if expires_at is not None and expires_at <= now:
        sub.status = "expired"
        sub.cancel_at_period_end = False
        sub.scheduled_plan_code = None
        return "subscription.expire"
    return action


async def load_plans(session: AsyncSession) -> dict[str, Plan]:
    """Every plan by code (a handful of rows; plans are never deleted)."""
    return {p.code: p for p in (await session.execute(select(Plan))).scalars()}


async def roll_locked(
    session: AsyncSession, sub: Subscription, plans: dict[str, Plan], now: datetime
) -> str | None:
    """Roll a row the caller holds locked; write the audit entry and the events in this
    transaction."""
    before = snapshot(sub)
    action = advance(sub, plans, now)
    if action:
        sub.updated_at = now
        await session.flush()
        audit.record(
            session,
            actor=None,
            action=action,
            target_type="subscription",
            target_id=sub.id,
            changes=audit.diff(before, snapshot(sub))
            | ({"org_id": str(sub.org_id)} if sub.org_id is not None else {"user_id": str(sub.user_id)}),
        )
        notify.rolled(session, sub, plans[sub.plan_code], before, now)
    return action


async def lock(session: AsyncSession, *where: ColumnElement[bool]) -> Subscription | None:
    """The subscription matching `where`, locked for this transaction and freshly read."""
    return (
        await session.execute(
            select(Subscription).where(*where).with_for_update().execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()


async def apply_locked(session: AsyncSession, sub_id: uuid.UUID, now: datetime) -> Subscription | None:
    """Lock the row, re-check and roll it forward; write the audit entry in this transaction."""
    sub = await lock(session, Subscription.id == sub_id)
    if sub is None or not is_due(sub, now):
        return sub
    await roll_locked(session, sub, await load_plans(session), now)
    return sub


async def ensure_current(
    session: AsyncSession, user_id: uuid.UUID | None, now: datetime, *, org_id: uuid.UUID | None = None
) -> Subscription | None:
    """The user's (or with `org_id` the organization's) subscription as of `now` (rolled over if
    due), or None if they never had one."""
    owner = Subscription.org_id == org_id if org_id is not None else Subscription.user_id == user_id
    sub = (await session.execute(select(Subscription).where(owner))).scalar_one_or_none()
    if sub is None or not is_due(sub, now):
        return sub
    return await apply_locked(session, sub.id, now)


def _due_predicates(now: datetime) -> list[ColumnElement[bool]]:
    # Two predicates rather than one OR, so the common one uses the (status, current_period_end)
    # index; rows with an `expires_at` are few (admin grants).
    active = Subscription.status == "active"
    return [
        active & (Subscription.current_period_end <= now),
        active & (Subscription.expires_at <= now),
    ]


async def _sweep_batch(session: AsyncSession, due: ColumnElement[bool], now: datetime) -> int:
    """Lock up to a batch of due rows nobody else holds, roll them; return how many rolled."""
    rows = (
        (
            await session.execute(
                select(Subscription)
                .where(due)
                .order_by(Subscription.current_period_end)
                .limit(SWEEP_BATCH_SIZE)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            )
        )
        .scalars()
        .all()
    )
    if not rows:
        return 0
    plans = await load_plans(session)
    rolled = 0
    for sub in rows:
        # re-checked on the locked row: a request may have rolled it just before we locked it
        if await roll_locked(session, sub, plans, now):
            rolled += 1
    return rolled


async def sweep_due(session: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: roll over every due subscription; return how many were rolled.

    Each batch commits in its own transaction (a fresh session on the same engine), so row
    locks are held briefly and a failure loses at most one batch; rows another worker holds are
    skipped (`SKIP LOCKED`) — that worker is rolling them. When the given session is not bound
    to an engine (a test joined to a connection), the batches run in it instead.
    """
    del settings  # the rule needs nothing from the configuration
    bind = session.bind
    total = 0
    for due in _due_predicates(now):
        while True:
            if isinstance(bind, AsyncEngine):
                async with AsyncSession(bind, expire_on_commit=False) as own, own.begin():
                    rolled = await _sweep_batch(own, due, now)
            else:
                rolled = await _sweep_batch(session, due, now)
            total += rolled
            # a rolled row is no longer due, so each pass makes progress; a batch that rolled
            # nothing means the rest is locked by others (or nothing is left)
            if rolled == 0:
                break
    return total


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

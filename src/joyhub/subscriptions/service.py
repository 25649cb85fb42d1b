"""Plans and subscriptions: the one place that decides subscribe, change, cancel and renew.

How a subscription changes is decided in exactly two places, both small and pure:

- `decide(sub, target, plans)` names what a request for plan `target` means for the user's
  current subscription: `CREATE` (none, cancelled or expired → a new period from now),
  `SAME_PLAN` (clear a pending cancellation or downgrade), `UPGRADE` (higher rank: new plan at
  once, same period, usage kept) or `DOWNGRADE` (lower rank: scheduled for the period end).
  `apply_change` carries it out on the row.
- `rollover.advance(sub, plans, now)` is what time does: renew into the next period (applying
  a scheduled downgrade), end a cancelled subscription, expire a grant.

Everything else here is plumbing around them: lock the user's one subscription row
(`SELECT … FOR UPDATE`, or insert it race-free), roll it forward to now, decide, apply, write the
audit entry — all in the request's single transaction.

The payment-provider seam
-------------------------
Payment is out of scope today: periods renew without charge. A provider (Stripe, Polar, …)
would plug in at these points and nowhere else:

1. `change_plan`, between `decide` and `apply_change`: for `CREATE`, start a checkout or charge
   the first period and apply only once it is paid (a webhook calls `change_plan` then); for
   `UPGRADE`, charge the prorated difference first; for `DOWNGRADE`/`SAME_PLAN`, tell the
   provider about the scheduled change or the cleared cancellation.
2. `rollover.advance`'s renewal branch: charge the next period before `tokens_used` resets; a
   failed charge would become a new status (e.g. `past_due`) instead of a renewal.
3. `cancel` / `resume`: mirror `cancel_at_period_end` to the provider's subscription.
4. `grant`: the admin's comp — no charge, by definition; it stays outside the provider.

The provider's webhooks then call these same functions, so the rules (ranks, periods, audit)
stay here and the provider only says "paid" or "not paid".

Where API.md is silent we follow Stripe's subscription model; each such choice says so below.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core import audit
from joyhub.core.errors import Conflict, NotFound, ValidationFailed, field_error
from joyhub.models import Plan, Subscription, User
from joyhub.subscriptions import notify, rollover
from joyhub.subscriptions.schemas import SubscriptionOut
from joyhub.webhooks import events


class Change(StrEnum):
    """What a `POST /subscriptions {plan}` means; the value is the audit action."""

    CREATE = "subscription.create"
    SAME_PLAN = "subscription.same_plan"
    UPGRADE = "subscription.upgrade"
    DOWNGRADE = "subscription.downgrade_scheduled"


# The webhook event of each change (API.md §11). Re-picking the plan clears what was pending —
# a cancellation or a scheduled downgrade — so the subscription goes on as it is: "resumed".
_CHANGE_EVENTS = {
    Change.CREATE: events.SUBSCRIPTION_CREATED,
    Change.SAME_PLAN: events.SUBSCRIPTION_RESUMED,
    Change.UPGRADE: events.SUBSCRIPTION_UPGRADED,
    Change.DOWNGRADE: events.SUBSCRIPTION_DOWNGRADE_SCHEDULED,
}


@dataclass(frozen=True)
class Owner:
    """Whose subscription: a user's (§4) or an organization's (§13) — one row each, the same
    lifecycle."""

    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        assert (self.user_id is None) != (self.org_id is None), "exactly one owner"

    def clause(self) -> ColumnElement[bool]:
        if self.org_id is not None:
            return Subscription.org_id == self.org_id
        return Subscription.user_id == self.user_id

    def audit(self) -> dict[str, str]:
        if self.org_id is not None:
            return {"org_id": str(self.org_id)}
        return {"user_id": str(self.user_id)}


def _owner_of(user_id: uuid.UUID | None, org_id: uuid.UUID | None) -> Owner:
    return Owner(org_id=org_id) if org_id is not None else Owner(user_id=user_id)


@dataclass(frozen=True)
class ChangeResult:
    subscription: SubscriptionOut
    change: Change

    @property
    def started_new_period(self) -> bool:
        """True when a new subscription period began (the route answers 201)."""
        return self.change is Change.CREATE


# --- plans ---------------------------------------------------------------------------------


async def list_plans(session: AsyncSession, *, include_inactive: bool = False) -> list[Plan]:
    """Plans by rank; the public catalog shows active ones only."""
    stmt = select(Plan).order_by(Plan.rank)
    if not include_inactive:
        stmt = stmt.where(Plan.is_active.is_(True))
    return list((await session.execute(stmt)).scalars())


def _plan_snapshot(plan: Plan) -> dict[str, Any]:
    return {
        "name": plan.name,
        "description": plan.description,
        "price_cents": plan.price_cents,
        "token_limit": plan.token_limit,
        "period_days": plan.period_days,
        "features": list(plan.features or []),
        "requests_per_minute": plan.requests_per_minute,
        "max_concurrent": plan.max_concurrent,
        "is_active": plan.is_active,
    }


async def update_plan(session: AsyncSession, *, actor: User, code: str, changes: dict[str, Any]) -> Plan:
    """Edit a plan. Subscriptions read `token_limit` from their plan, so a new limit applies to
    all of them at once; a new `period_days` or price applies from each one's next period
    (Stripe: a price change takes effect at the next renewal).

    Deactivating a plan hides it from the catalog and refuses new subscriptions to it, while
    existing subscribers keep it and keep renewing (Stripe: an archived price keeps its
    subscriptions).
    """
    plan = (
        await session.execute(select(Plan).where(Plan.code == code).with_for_update())
    ).scalar_one_or_none()
    if plan is None:
        raise NotFound("No such plan")
    before = _plan_snapshot(plan)
    for field, value in changes.items():
        setattr(plan, field, value)
    after = _plan_snapshot(plan)
    diff = audit.diff(before, after)
    if diff:
        await session.flush()
        audit.record(
            session, actor=actor, action="plan.update", target_type="plan", target_id=code, changes=diff
        )
    return plan


async def _available_plan(session: AsyncSession, code: str) -> Plan:
    """The plan a user or admin asks for: it must exist and be active (else 422 on body.plan).

    Admin grants follow the same rule (Stripe refuses archived prices for new subscriptions);
    reactivate the plan first to grant it.
    """
    plan = await session.get(Plan, code)
    if plan is None:
        raise ValidationFailed("Unknown plan", details=[field_error("body.plan", f"Unknown plan '{code}'")])
    if not plan.is_active:
        raise ValidationFailed(
            "Plan not available", details=[field_error("body.plan", f"Plan '{code}' is not available")]
        )
    return plan


# --- the decision ----------------------------------------------------------------------------


def decide(sub: Subscription | None, target: Plan, plans: dict[str, Plan]) -> Change:
    """What asking for `target` means for `sub` (already rolled forward to now)."""
    if sub is None or sub.status != "active":
        return Change.CREATE
    if target.code == sub.plan_code:
        return Change.SAME_PLAN
    if target.rank > plans[sub.plan_code].rank:
        return Change.UPGRADE
    return Change.DOWNGRADE


def start_period(sub: Subscription, plan: Plan, now: datetime) -> None:
    """A fresh subscription on `plan` from `now`: nothing pending, nothing used, no end date."""
    sub.plan_code = plan.code
    sub.status = "active"
    sub.tokens_used = 0
    sub.current_period_start = now
    sub.current_period_end = now + timedelta(days=plan.period_days)
    sub.cancel_at_period_end = False
    sub.scheduled_plan_code = None
    sub.expires_at = None


def apply_change(sub: Subscription, change: Change, target: Plan, now: datetime) -> None:
    """Carry out `decide`'s verdict on the locked row."""
    if change is Change.CREATE:
        start_period(sub, target, now)
    elif change is Change.SAME_PLAN:
        sub.cancel_at_period_end = False
        sub.scheduled_plan_code = None
    elif change is Change.UPGRADE:
        # Same period, usage kept; the limit is the new plan's at once (read from the plan).
        # A scheduled downgrade is superseded by the new choice. A pending cancellation is
        # kept, as Stripe keeps `cancel_at_period_end` across plan changes: the user ends on
        # the higher plan unless they resume (or re-pick the same plan). An admin's
        # `expires_at` is kept too (Stripe keeps `cancel_at` across updates).
        sub.plan_code = target.code
        sub.scheduled_plan_code = None
    else:
        # Applied at the period end by rollover; a pending cancellation still wins then.
        sub.scheduled_plan_code = target.code


# --- subscription operations ------------------------------------------------------------------


async def _view(session: AsyncSession, sub: Subscription) -> SubscriptionOut:
    plan = await session.get(Plan, sub.plan_code)
    assert plan is not None  # foreign key
    return SubscriptionOut.of(sub, plan)


async def _notify(session: AsyncSession, event_type: str, sub: Subscription, now: datetime) -> None:
    """The change's webhook event, in this transaction (`notify.changed`)."""
    plan = await session.get(Plan, sub.plan_code)
    assert plan is not None  # foreign key
    notify.changed(session, event_type, sub, plan, now)


async def current(
    session: AsyncSession, user_id: uuid.UUID | None, now: datetime, *, org_id: uuid.UUID | None = None
) -> SubscriptionOut | None:
    """The user's (or organization's) subscription rolled forward to now, or None if they never
    subscribed."""
    sub = await rollover.ensure_current(session, user_id, now, org_id=org_id)
    return None if sub is None else await _view(session, sub)


async def _lock_or_insert(
    session: AsyncSession, owner: Owner, plan: Plan, now: datetime
) -> tuple[Subscription, bool]:
    """The user's one subscription row, locked; inserted (a new period on `plan`) if missing.

    Two first subscribes racing: both miss the row, both insert with `ON CONFLICT (user_id) DO
    NOTHING`; the second waits for the first to commit, inserts nothing, and then locks and
    handles the row the first one created. Exactly one row, no unique-violation 500.
    """
    sub = await rollover.lock(session, owner.clause())
    if sub is not None:
        return sub, False
    inserted = (
        await session.execute(
            pg_insert(Subscription)
            .values(
                id=uuid.uuid4(),
                user_id=owner.user_id,
                org_id=owner.org_id,
                plan_code=plan.code,
                status="active",
                tokens_used=0,
                tokens_reserved=0,
                inflight=0,
                current_period_start=now,
                current_period_end=now + timedelta(days=plan.period_days),
                cancel_at_period_end=False,
                scheduled_plan_code=None,
                expires_at=None,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(
                index_elements=[Subscription.user_id if owner.org_id is None else Subscription.org_id]
            )
            .returning(Subscription.id)
        )
    ).scalar_one_or_none()
    sub = await rollover.lock(session, owner.clause())
    assert sub is not None  # we inserted it, or the winner of the race committed it
    return sub, inserted is not None


def _record(
    session: AsyncSession,
    *,
    actor: User | None,
    action: str,
    sub: Subscription,
    before: dict[str, object],
    extra: dict[str, Any] | None = None,
) -> None:
    audit.record(
        session,
        actor=actor,
        action=action,
        target_type="subscription",
        target_id=sub.id,
        changes=audit.diff(before, rollover.snapshot(sub))
        | _owner_of(sub.user_id, sub.org_id).audit()
        | (extra or {}),
    )


async def change_plan(
    session: AsyncSession,
    *,
    actor: User,
    user_id: uuid.UUID | None,
    plan_code: str,
    now: datetime,
    org_id: uuid.UUID | None = None,
) -> ChangeResult:
    """`POST /subscriptions {plan}` (or an organization's): subscribe, re-pick, upgrade or
    schedule a downgrade."""
    target = await _available_plan(session, plan_code)
    sub, inserted = await _lock_or_insert(session, _owner_of(user_id, org_id), target, now)
    if inserted:
        change, before = Change.CREATE, {}
    else:
        plans = await rollover.load_plans(session)
        await rollover.roll_locked(session, sub, plans, now)  # time first, then the request
        before = rollover.snapshot(sub)
        change = decide(sub, target, plans)
        apply_change(sub, change, target, now)
    # Like Stripe's events, an audit row and an event only when something changed: re-picking
    # the same plan with nothing pending is a no-op.
    if rollover.snapshot(sub) != before:
        sub.updated_at = now
        await session.flush()
        _record(session, actor=actor, action=change.value, sub=sub, before=before)
        await _notify(session, _CHANGE_EVENTS[change], sub, now)
    return ChangeResult(await _view(session, sub), change)


async def _locked_current(session: AsyncSession, owner: Owner, now: datetime) -> Subscription:
    sub = await rollover.lock(session, owner.clause())
    if sub is None:
        raise NotFound("You have no subscription" if owner.org_id is None else "No subscription")
    await rollover.roll_locked(session, sub, await rollover.load_plans(session), now)
    return sub


async def cancel(
    session: AsyncSession,
    *,
    actor: User,
    user_id: uuid.UUID | None,
    now: datetime,
    org_id: uuid.UUID | None = None,
) -> SubscriptionOut:
    """Cancel at the period end (idempotent). Never subscribed → 404; already ended → 409.

    An ended subscription exists but its state forbids the action, hence 409 CONFLICT rather
    than 404 (Stripe likewise refuses to cancel a canceled subscription), matching `resume`.
    """
    sub = await _locked_current(session, _owner_of(user_id, org_id), now)
    if sub.status != "active":
        raise Conflict(f"The subscription has already ended ({sub.status})")
    if not sub.cancel_at_period_end:
        before = rollover.snapshot(sub)
        sub.cancel_at_period_end = True
        sub.updated_at = now
        await session.flush()
        _record(session, actor=actor, action="subscription.cancel", sub=sub, before=before)
        await _notify(session, events.SUBSCRIPTION_CANCELLED, sub, now)
    return await _view(session, sub)


async def resume(
    session: AsyncSession,
    *,
    actor: User,
    user_id: uuid.UUID | None,
    now: datetime,
    org_id: uuid.UUID | None = None,
) -> SubscriptionOut:
    """Undo a pending cancellation before the period end; after the end → 409 (API.md §4).

    Resuming with nothing pending is a harmless no-op (200), like cancelling twice.
    """
    sub = await _locked_current(session, _owner_of(user_id, org_id), now)
    if sub.status != "active":
        raise Conflict("The subscription has already ended; subscribe again to start a new one")
    if sub.cancel_at_period_end:
        before = rollover.snapshot(sub)
        sub.cancel_at_period_end = False
        sub.updated_at = now
        await session.flush()
        _record(session, actor=actor, action="subscription.resume", sub=sub, before=before)
        await _notify(session, events.SUBSCRIPTION_RESUMED, sub, now)
    return await _view(session, sub)


async def grant(
    session: AsyncSession,
    *,
    admin: User,
    user_id: uuid.UUID | None,
    plan_code: str,
    expires_at: datetime | None,
    now: datetime,
    org_id: uuid.UUID | None = None,
) -> SubscriptionOut:
    """An admin puts a user (or an organization, whose existence the caller checked) on a plan
    now: a new period from now, nothing used, nothing pending, optionally ending at `expires_at`
    (which must be in the future)."""
    if org_id is None and (user_id is None or await session.get(User, user_id) is None):
        raise NotFound("No such user")
    target = await _available_plan(session, plan_code)
    if expires_at is not None and expires_at <= now:
        raise ValidationFailed(
            "expires_at must be in the future",
            details=[field_error("body.expires_at", "must be in the future")],
        )
    sub, inserted = await _lock_or_insert(session, _owner_of(user_id, org_id), target, now)
    if inserted:
        before: dict[str, object] = {}
    else:
        # record what time did before the grant replaces the period, for an honest history
        await rollover.roll_locked(session, sub, await rollover.load_plans(session), now)
        before = rollover.snapshot(sub)
    start_period(sub, target, now)
    sub.expires_at = expires_at
    sub.updated_at = now
    await session.flush()
    _record(session, actor=admin, action="subscription.grant", sub=sub, before=before)
    # A grant starts a subscription period from now, whatever there was: "created". When it
    # replaces a running period, the quota starts over too.
    await _notify(session, events.SUBSCRIPTION_CREATED, sub, now)
    if before.get("status") == "active":
        previous = before["tokens_used"]
        notify.period_reset(session, sub, previous if isinstance(previous, int) else 0, now)
    return await _view(session, sub)

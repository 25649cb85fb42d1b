"""The webhook events of subscription changes (API.md §11), written in the change's transaction.

Each function is called at the one place its change is applied — `service.change_plan`,
`cancel`, `resume`, `grant`, and `rollover.roll_locked` for what time does — right after the
row is flushed, so the event carries the subscription exactly as the change left it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.clock import iso_utc
from joyhub.models import Plan, Subscription
from joyhub.subscriptions.schemas import SubscriptionOut
from joyhub.webhooks import events


def changed(session: AsyncSession, event_type: str, sub: Subscription, plan: Plan, now: datetime) -> None:
    """`subscription.*`: `{subscription: Subscription, user_id}` (an organization's: `org_id`
    in place of `user_id`, API.md §13)."""
    events.emit(
        session,
        event_type,
        user_id=sub.user_id,
        org_id=sub.org_id,
        data={"subscription": SubscriptionOut.of(sub, plan).model_dump(mode="json"), **_owner(sub)},
        now=now,
    )


def _owner(sub: Subscription) -> dict[str, str]:
    if sub.org_id is not None:
        return {"org_id": str(sub.org_id)}
    return {"user_id": str(sub.user_id)}


def period_reset(session: AsyncSession, sub: Subscription, previous_tokens_used: int, now: datetime) -> None:
    """`quota.period_reset`: a new period began and `tokens_used` went back to 0."""
    events.emit(
        session,
        events.QUOTA_PERIOD_RESET,
        user_id=sub.user_id,
        org_id=sub.org_id,
        data={
            "subscription_id": str(sub.id),
            **_owner(sub),
            "previous_tokens_used": previous_tokens_used,
            "period_start": iso_utc(sub.current_period_start),
            "period_end": iso_utc(sub.current_period_end),
        },
        now=now,
    )


def rolled(
    session: AsyncSession, sub: Subscription, plan: Plan, before: dict[str, object], now: datetime
) -> None:
    """What time did (`rollover.advance`), as events: renewals (with the quota reset they bring),
    then the end of a cancelled subscription or the expiry of a grant."""
    if sub.current_period_start.isoformat() != before["current_period_start"]:
        changed(session, events.SUBSCRIPTION_RENEWED, sub, plan, now)
        previous = before["tokens_used"]
        period_reset(session, sub, previous if isinstance(previous, int) else 0, now)
    if sub.status != before["status"]:
        if sub.status == "cancelled":
            changed(session, events.SUBSCRIPTION_ENDED, sub, plan, now)
        elif sub.status == "expired":
            changed(session, events.SUBSCRIPTION_EXPIRED, sub, plan, now)

"""The pure time rule `rollover.advance`: boundaries, catch-up and the order of events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from joyhub.models import Plan, Subscription
from joyhub.subscriptions.rollover import advance, is_due

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
PLANS = {
    "free": Plan(code="free", period_days=30, rank=0),
    "pro": Plan(code="pro", period_days=30, rank=1),
    "weekly": Plan(code="weekly", period_days=7, rank=-1),
}


def sub(**fields: Any) -> Subscription:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "user_id": uuid.uuid4(),
        "plan_code": "pro",
        "status": "active",
        "tokens_used": 42,
        "current_period_start": T0,
        "current_period_end": T0 + 30 * DAY,
        "cancel_at_period_end": False,
        "scheduled_plan_code": None,
        "expires_at": None,
    }
    values.update(fields)
    return Subscription(**values)


def test_nothing_before_the_end() -> None:
    s = sub()
    assert advance(s, PLANS, T0 + 30 * DAY - timedelta(microseconds=1)) is None
    assert (s.tokens_used, s.current_period_start) == (42, T0)


def test_renews_exactly_at_the_end() -> None:
    s = sub()
    assert advance(s, PLANS, T0 + 30 * DAY) == "subscription.renew"
    assert (s.current_period_start, s.current_period_end, s.tokens_used) == (T0 + 30 * DAY, T0 + 60 * DAY, 0)
    # idempotent: a second pass at the same instant does nothing
    assert advance(s, PLANS, T0 + 30 * DAY) is None


@pytest.mark.parametrize(("days", "start_day"), [(31, 30), (59, 30), (60, 60), (95, 90), (365, 360)])
def test_catches_up_missed_periods_at_once(days: int, start_day: int) -> None:
    s = sub()
    assert advance(s, PLANS, T0 + days * DAY) == "subscription.renew"
    assert s.current_period_start == T0 + start_day * DAY
    assert s.current_period_end == T0 + (start_day + 30) * DAY
    assert not is_due(s, T0 + days * DAY)


def test_scheduled_downgrade_applies_at_the_first_boundary_with_its_own_length() -> None:
    s = sub(scheduled_plan_code="weekly")
    assert advance(s, PLANS, T0 + 45 * DAY) == "subscription.downgrade_applied"
    assert (s.plan_code, s.scheduled_plan_code) == ("weekly", None)
    assert s.current_period_start == T0 + 44 * DAY  # 30 + 2 weeks
    assert s.current_period_end == T0 + 51 * DAY


def test_pending_cancellation_ends_it_at_the_boundary() -> None:
    s = sub(cancel_at_period_end=True, scheduled_plan_code="free")
    assert advance(s, PLANS, T0 + 90 * DAY) == "subscription.cancelled"
    assert (s.status, s.cancel_at_period_end, s.scheduled_plan_code) == ("cancelled", False, None)
    assert (s.current_period_end, s.tokens_used) == (T0 + 30 * DAY, 42)
    assert not is_due(s, T0 + 900 * DAY)
    assert advance(s, PLANS, T0 + 900 * DAY) is None


def test_expiry_inside_the_period() -> None:
    s = sub(expires_at=T0 + 10 * DAY, cancel_at_period_end=True)
    assert advance(s, PLANS, T0 + 10 * DAY - timedelta(microseconds=1)) is None
    assert advance(s, PLANS, T0 + 10 * DAY) == "subscription.expire"
    assert (s.status, s.cancel_at_period_end, s.tokens_used, s.current_period_end) == (
        "expired",
        False,
        42,
        T0 + 30 * DAY,
    )


def test_expiry_at_the_boundary_is_not_a_renewal() -> None:
    s = sub(expires_at=T0 + 30 * DAY, cancel_at_period_end=True)
    assert advance(s, PLANS, T0 + 40 * DAY) == "subscription.expire"
    assert (s.status, s.current_period_start, s.tokens_used) == ("expired", T0, 42)


def test_renewals_up_to_the_expiry_then_expired() -> None:
    s = sub(expires_at=T0 + 75 * DAY)
    assert advance(s, PLANS, T0 + 200 * DAY) == "subscription.expire"
    assert (s.status, s.current_period_start, s.current_period_end, s.tokens_used) == (
        "expired",
        T0 + 60 * DAY,
        T0 + 90 * DAY,
        0,
    )


def test_cancellation_before_a_later_expiry_wins() -> None:
    s = sub(expires_at=T0 + 75 * DAY, cancel_at_period_end=True)
    assert advance(s, PLANS, T0 + 200 * DAY) == "subscription.cancelled"
    assert s.status == "cancelled"


def test_future_expiry_does_not_stop_renewals() -> None:
    s = sub(expires_at=T0 + 75 * DAY)
    assert advance(s, PLANS, T0 + 65 * DAY) == "subscription.renew"
    assert (s.status, s.current_period_start) == ("active", T0 + 60 * DAY)


@pytest.mark.parametrize("status", ["cancelled", "expired"])
def test_ended_subscriptions_never_move(status: str) -> None:
    s = sub(status=status, expires_at=T0)
    assert not is_due(s, T0 + 400 * DAY)
    assert advance(s, PLANS, T0 + 400 * DAY) is None

"""The one source of "now", so tests can move time (period rollover, token expiry)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Wall clock in UTC with an offset that tests may shift forward, or stop (`freeze`) so that
    arithmetic on time — a rate limit's buckets — can be checked to the microsecond."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self.frozen: datetime | None = None

    def now(self) -> datetime:
        return (self.frozen or datetime.now(UTC)) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta

    def freeze(self) -> None:
        self.frozen = datetime.now(UTC)

    def reset(self) -> None:
        self.offset = timedelta(0)
        self.frozen = None


clock = Clock()


def utcnow() -> datetime:
    return clock.now()


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with a `Z` — how the API writes every timestamp (as pydantic does for UTC
    datetimes); a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")

"""The date and timestamp range rules of API.md §6, and how a range is cut for the read models.

Parsing (`start_date` / `end_date` query parameters):
- `YYYY-MM-DD` is a whole UTC day. As `start_date` it means that day's 00:00 UTC (included); as
  `end_date` the day is *inclusive*, so the range ends at the next day's 00:00 UTC (excluded).
- A full ISO 8601 timestamp (`2025-03-01T12:00:00Z`, `…+02:00`, fractional seconds allowed) is an
  instant. Ranges are half-open `[start, end)` everywhere, so `end_date=2025-03-01` and
  `end_date=2025-03-02T00:00:00Z` mean the same thing. A timestamp without an offset is taken as
  UTC (a browser's date picker often sends one; rejecting it would be unhelpful, and UTC is what
  every date in this API means). A `+` decoded to a space by a careless client
  (`…T12:00:00 02:00`) is read as the `+` it was.
- Anything else is 422 `VALIDATION_ERROR` naming `query.start_date` / `query.end_date`. A start
  after the end is 422 on `query.start_date`; with a date as `end_date` that includes a start on
  the day after it (`start_date=D+1&end_date=D`). Two equal timestamps are an empty range, not
  an error.

Cutting (`split`): the rollups count whole UTC days (`usage_daily`) and whole UTC hours
(`usage_hourly`). `split(start, end, unit)` cuts `[start, end)` into the aligned middle that a
rollup answers, plus at most two ragged edges, each lying inside a single unit, that must be
answered another way (a finer rollup, or a bounded scan of the raw logs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import Depends, Query
from pydantic import PlainSerializer, WithJsonSchema

from joyhub.core.clock import iso_utc
from joyhub.core.errors import ValidationFailed, field_error

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")
_SPACE_FOR_PLUS_RE = re.compile(r"^(.*T.*\d)\s(\d{2}(:?\d{2})?)$")
MAX_PARAM_LENGTH = 64


UtcDateTime = Annotated[
    datetime,
    PlainSerializer(iso_utc, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]
"""A datetime that serialises as ISO 8601 in UTC (`...Z`), whatever offset it was read with."""


@dataclass(frozen=True)
class Bound:
    """One parsed range bound: the instant it stands for, and whether it was given as a date."""

    instant: datetime
    is_date: bool


@dataclass(frozen=True)
class TimeRange:
    """A half-open range `[start, end)`; `None` is unbounded on that side."""

    start: datetime | None
    end: datetime | None

    @property
    def bounded(self) -> bool:
        return self.start is not None and self.end is not None

    def length(self) -> timedelta:
        assert self.start is not None and self.end is not None
        return self.end - self.start


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(details=[field_error(f"query.{field}", message)])


def parse_bound(raw: str, *, field: str, is_end: bool) -> Bound:
    """Parse one `start_date`/`end_date` value (see the module docstring for the rules)."""
    value = raw.strip()
    if len(value) > MAX_PARAM_LENGTH or "\x00" in value:
        raise _invalid(field, "Expected a date (YYYY-MM-DD) or an ISO 8601 timestamp")
    try:
        if _DATE_RE.match(value):
            day = date.fromisoformat(value)
            start = datetime.combine(day, time(0), tzinfo=UTC)
            return Bound(start + DAY if is_end else start, is_date=True)
        if _TIMESTAMP_RE.match(value):
            fixed = _SPACE_FOR_PLUS_RE.sub(r"\1+\2", value)
            parsed = datetime.fromisoformat(fixed)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return Bound(parsed.astimezone(UTC), is_date=False)
    except (ValueError, OverflowError):
        pass
    raise _invalid(field, "Expected a date (YYYY-MM-DD) or an ISO 8601 timestamp")


def parse_range(start_raw: str | None, end_raw: str | None) -> tuple[Bound | None, Bound | None]:
    """Parse both bounds and reject an inverted range (422 on `query.start_date`)."""
    start = parse_bound(start_raw, field="start_date", is_end=False) if start_raw is not None else None
    end = parse_bound(end_raw, field="end_date", is_end=True) if end_raw is not None else None
    if start is not None and end is not None:
        check_order(start.instant, end)
    return start, end


def check_order(start: datetime, end: Bound) -> None:
    """Reject a start after the end. With a date as `end_date`, a start at or after the next
    day's 00:00 is after it; with a timestamp, equal bounds are merely an empty range."""
    if start > end.instant or (end.is_date and start >= end.instant):
        raise _invalid("start_date", "start_date must not be after end_date")


def resolve(start: Bound | None, end: Bound | None, default: TimeRange) -> TimeRange:
    """The requested range, each missing side taken from `default` (then re-checked for order)."""
    lo = start.instant if start is not None else default.start
    hi = end.instant if end is not None else default.end
    if lo is not None and hi is not None:
        check_order(lo, end if end is not None else Bound(hi, is_date=False))
    return TimeRange(lo, hi)


def floor_to(value: datetime, unit: timedelta) -> datetime:
    value = value.astimezone(UTC)
    if unit == DAY:
        return value.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == HOUR:
        return value.replace(minute=0, second=0, microsecond=0)
    raise ValueError(f"unsupported unit {unit}")


def ceil_to(value: datetime, unit: timedelta) -> datetime:
    floored = floor_to(value, unit)
    return floored if floored == value else floored + unit


def day_range(start_day: date, end_day_inclusive: date) -> TimeRange:
    return TimeRange(
        datetime.combine(start_day, time(0), tzinfo=UTC),
        datetime.combine(end_day_inclusive, time(0), tzinfo=UTC) + DAY,
    )


@dataclass(frozen=True)
class Split:
    """`[start, end)` as an aligned middle (`whole`, possibly unbounded or None when empty) and
    ragged `edges`, each inside a single unit and bounded."""

    whole: TimeRange | None
    edges: tuple[tuple[datetime, datetime], ...]


def split(rng: TimeRange, unit: timedelta) -> Split:
    """Cut a range for a rollup of granularity `unit` (see the module docstring)."""
    start, end = rng.start, rng.end
    if start is not None and end is not None and start >= end:
        return Split(None, ())
    lo = ceil_to(start, unit) if start is not None else None
    hi = floor_to(end, unit) if end is not None else None
    if start is not None and end is not None and lo is not None and hi is not None and lo >= hi:
        # adjacent units with no whole one between: a ragged piece in each; else both in one unit
        pieces: tuple[tuple[datetime, datetime], ...] = (
            ((start, lo), (lo, end)) if lo == hi else ((start, end),)
        )
        return Split(None, tuple((a, b) for a, b in pieces if a < b))
    edges: list[tuple[datetime, datetime]] = []
    if start is not None and lo is not None and start < lo:
        edges.append((start, lo))
    if end is not None and hi is not None and hi < end:
        edges.append((hi, end))
    return Split(TimeRange(lo, hi), tuple(edges))


def buckets(rng: TimeRange, unit: timedelta) -> list[datetime]:
    """Every bucket start from the unit holding `start` up to (excluding) `end`."""
    assert rng.start is not None and rng.end is not None
    out: list[datetime] = []
    cursor = floor_to(rng.start, unit)
    while cursor < rng.end:
        out.append(cursor)
        cursor += unit
    return out


_PARAM_HELP = (
    "YYYY-MM-DD (a whole UTC day; end_date inclusive) or an ISO 8601 timestamp "
    "(no offset = UTC; end exclusive)"
)


async def range_params(
    start_date: Annotated[
        str | None, Query(max_length=MAX_PARAM_LENGTH, description=f"Range start: {_PARAM_HELP}")
    ] = None,
    end_date: Annotated[
        str | None, Query(max_length=MAX_PARAM_LENGTH, description=f"Range end: {_PARAM_HELP}")
    ] = None,
) -> tuple[Bound | None, Bound | None]:
    """The `start_date`/`end_date` query parameters, parsed and checked for order."""
    return parse_range(start_date, end_date)


RangeParams = Annotated[tuple[Bound | None, Bound | None], Depends(range_params)]

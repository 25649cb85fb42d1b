"""The date/timestamp range rules and the range cutting used by the read models."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from joyhub.admin.service import week_cut
from joyhub.core.errors import ValidationFailed
from joyhub.usage.dates import (
    DAY,
    HOUR,
    TimeRange,
    buckets,
    parse_bound,
    parse_range,
    split,
)

pytestmark = pytest.mark.unit


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_a_date_is_a_whole_utc_day_and_end_date_is_inclusive() -> None:
    start = parse_bound("2025-03-01", field="start_date", is_end=False)
    end = parse_bound("2025-03-01", field="end_date", is_end=True)
    assert start.instant == utc(2025, 3, 1) and start.is_date
    assert end.instant == utc(2025, 3, 2) and end.is_date


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-03-01T12:30:00Z", utc(2025, 3, 1, 12, 30)),
        ("2025-03-01T12:30:00+00:00", utc(2025, 3, 1, 12, 30)),
        ("2025-03-01T14:30:00+02:00", utc(2025, 3, 1, 12, 30)),
        ("2025-03-01T14:30:00 02:00", utc(2025, 3, 1, 12, 30)),  # '+' decoded to a space
        ("2025-03-01T12:30:00", utc(2025, 3, 1, 12, 30)),  # naive = UTC
        ("2025-03-01 12:30", utc(2025, 3, 1, 12, 30)),
        ("2025-03-01T12:30:00.250000Z", utc(2025, 3, 1, 12, 30, 0, 250000)),
    ],
)
def test_timestamps_are_instants_in_utc(raw: str, expected: datetime) -> None:
    bound = parse_bound(raw, field="end_date", is_end=True)
    assert bound.instant == expected and not bound.is_date
    assert bound.instant.tzinfo is not None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "yesterday",
        "2025-13-01",
        "2025-02-30",
        "20250301",
        "2025-03",
        "2025-03-01T25:00:00",
        "2025-03-01T12:00:00+25:00",
        "2025-03-01\x00",
        "x" * 65,
        "9999-12-31T23:59:59+99:00",
    ],
)
def test_malformed_values_are_422_naming_the_field(raw: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        parse_bound(raw, field="start_date", is_end=False)
    assert err.value.details[0]["field"] == "query.start_date"


def test_the_last_representable_day_as_end_date_is_422_not_500() -> None:
    with pytest.raises(ValidationFailed):
        parse_bound("9999-12-31", field="end_date", is_end=True)


def test_inverted_ranges_are_422_on_start_date() -> None:
    for start, end in [
        ("2025-03-02", "2025-03-01"),
        ("2025-03-02T00:00:00Z", "2025-03-01"),  # start = the day after end_date
        ("2025-03-01T12:00:01Z", "2025-03-01T12:00:00Z"),
    ]:
        with pytest.raises(ValidationFailed) as err:
            parse_range(start, end)
        assert err.value.details[0]["field"] == "query.start_date"


def test_one_day_and_empty_ranges_are_allowed() -> None:
    start, end = parse_range("2025-03-01", "2025-03-01")
    assert start is not None and end is not None
    assert (start.instant, end.instant) == (utc(2025, 3, 1), utc(2025, 3, 2))
    start, end = parse_range("2025-03-01T12:00:00Z", "2025-03-01T12:00:00Z")
    assert start is not None and end is not None and start.instant == end.instant
    start, end = parse_range("2025-03-01T23:00:00Z", "2025-03-01")
    assert start is not None and end is not None and start.instant < end.instant


def test_split_aligned_range_has_no_edges() -> None:
    cut = split(TimeRange(utc(2025, 3, 1), utc(2025, 3, 8)), DAY)
    assert cut.whole == TimeRange(utc(2025, 3, 1), utc(2025, 3, 8)) and cut.edges == ()


def test_split_ragged_range_has_edges_inside_one_unit_each() -> None:
    cut = split(TimeRange(utc(2025, 3, 1, 9, 30), utc(2025, 3, 5, 2)), DAY)
    assert cut.whole == TimeRange(utc(2025, 3, 2), utc(2025, 3, 5))
    assert cut.edges == ((utc(2025, 3, 1, 9, 30), utc(2025, 3, 2)), (utc(2025, 3, 5), utc(2025, 3, 5, 2)))


def test_split_inside_one_unit_and_across_one_boundary() -> None:
    inside = split(TimeRange(utc(2025, 3, 1, 9), utc(2025, 3, 1, 10)), DAY)
    assert inside.whole is None and inside.edges == ((utc(2025, 3, 1, 9), utc(2025, 3, 1, 10)),)
    across = split(TimeRange(utc(2025, 3, 1, 9, 15), utc(2025, 3, 1, 10, 5)), HOUR)
    assert across.whole is None
    assert across.edges == (
        (utc(2025, 3, 1, 9, 15), utc(2025, 3, 1, 10)),
        (utc(2025, 3, 1, 10), utc(2025, 3, 1, 10, 5)),
    )
    empty = split(TimeRange(utc(2025, 3, 1, 9), utc(2025, 3, 1, 9)), HOUR)
    assert empty.whole is None and empty.edges == ()


def test_split_unbounded_sides() -> None:
    cut = split(TimeRange(None, utc(2025, 3, 1, 6)), DAY)
    assert cut.whole == TimeRange(None, utc(2025, 3, 1))
    assert cut.edges == ((utc(2025, 3, 1), utc(2025, 3, 1, 6)),)
    assert split(TimeRange(None, None), DAY).whole == TimeRange(None, None)


def test_buckets_start_at_the_unit_holding_start() -> None:
    rng = TimeRange(utc(2025, 3, 1, 9, 30), utc(2025, 3, 1, 12))
    assert buckets(rng, HOUR) == [utc(2025, 3, 1, h) for h in (9, 10, 11)]
    assert buckets(TimeRange(utc(2025, 3, 1), utc(2025, 3, 4)), DAY) == [
        utc(2025, 3, 1) + i * DAY for i in range(3)
    ]


def test_week_cut_finds_the_whole_monday_weeks_inside() -> None:
    # 2025-03-03 is a Monday
    assert week_cut(date(2025, 3, 3), date(2025, 3, 10)) == (date(2025, 3, 3), date(2025, 3, 10))
    assert week_cut(date(2025, 3, 4), date(2025, 3, 17)) == (date(2025, 3, 10), date(2025, 3, 17))
    assert week_cut(date(2025, 3, 4), date(2025, 3, 16)) is None
    first = date(2025, 2, 1)
    for span in range(0, 40):
        cut = week_cut(first, first + timedelta(days=span))
        if cut is not None:
            assert cut[0].weekday() == 0 and cut[1].weekday() == 0
            assert first <= cut[0] < cut[1] <= first + timedelta(days=span)

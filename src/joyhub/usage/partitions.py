"""Monthly partitions of `usage_logs` (issue 18): naming, creation ahead of time, listing.

The table is partitioned by RANGE on `started_at`, the admission time (never updated, so a row
never moves). One partition per UTC calendar month, `usage_logs_pYYYYMM`, covering
`[first of month, first of next month)`, and a DEFAULT partition `usage_logs_default` as a safety
net: an admission whose month has no partition yet (the sweep fell behind, a clock far off) is
still written rather than refused — losing a charged call's record would be worse than a row in
the wrong place. The sweep moves such rows out when it creates their month
(`ensure_partitions`), and keeps the current month and the next AHEAD_MONTHS created ahead of
time, so the default stays empty in normal running (adding a partition scans the default).

Reads of the raw logs select by the settle time `timestamp`; to let PostgreSQL prune they also
bound `started_at`: a call settles at most SETTLE_WINDOW after its admission (the longest call
is bounded by TOOL_STREAM_MAX_SECONDS ≤ 1 day plus the upstream timeouts, and the stale-call
sweep stamps an abandoned call at most SETTLE_WINDOW after its start), so
`started_at ∈ [timestamp - SETTLE_WINDOW, timestamp]`.

No extension (pg_partman) is needed, so the embedded PostgreSQL behaves the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

PARENT = "usage_logs"
DEFAULT = "usage_logs_default"
AHEAD_MONTHS = 2
SETTLE_WINDOW = timedelta(days=2)
# serialises partition maintenance across workers (every worker runs the sweep)
MAINTENANCE_LOCK = 4_242_018
# DDL on the parent takes a strong lock: never queue the hot path behind it for long
LOCK_TIMEOUT = "3s"

_NAME = re.compile(r"^usage_logs_(p(\d{4})(\d{2})|default)$")


def month_of(moment: datetime | date) -> date:
    """The first day of the (UTC) month holding `moment`."""
    if isinstance(moment, datetime):
        moment = moment.astimezone(UTC).date()
    return moment.replace(day=1)


def add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def month_start(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=UTC)


def partition_name(month: date) -> str:
    return f"{PARENT}_p{month:%Y%m}"


def is_partition(name: str) -> bool:
    """Whether a table name is one of `usage_logs`' partitions (Alembic's autogenerate ignores them)."""
    return _NAME.match(name) is not None


def month_of_partition(name: str) -> date | None:
    match = _NAME.match(name)
    if match is None or match.group(2) is None:
        return None
    return date(int(match.group(2)), int(match.group(3)), 1)


@dataclass(frozen=True)
class Partition:
    """One monthly partition: `[start, end)` of `started_at`."""

    name: str
    month: date

    @property
    def start(self) -> datetime:
        return month_start(self.month)

    @property
    def end(self) -> datetime:
        return month_start(add_months(self.month, 1))


_LIST = text(
    """
    SELECT c.relname FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    JOIN pg_class AS p ON p.oid = i.inhparent
    WHERE p.relname = 'usage_logs' AND p.relnamespace = to_regnamespace(current_schema())::oid
    ORDER BY c.relname
    """
)


async def monthly_partitions(session: AsyncSession) -> list[Partition]:
    """The attached monthly partitions, oldest first (the default partition is not listed)."""
    names = (await session.execute(_LIST)).scalars().all()
    found = [(name, month_of_partition(name)) for name in names]
    return [Partition(name, month) for name, month in found if month is not None]


async def has_default(session: AsyncSession) -> bool:
    return bool((await session.execute(_LIST)).scalars().all().count(DEFAULT))


def bounds_sql(month: date) -> str:
    """`FOR VALUES FROM (…) TO (…)` of a month: literals of our own computing, never input."""
    lo, hi = month_start(month), month_start(add_months(month, 1))
    return f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"


_STRAY = text(
    f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE started_at >= :lo AND started_at < :hi)"  # noqa: S608
)
_MOVE = text(
    f"DELETE FROM {DEFAULT} WHERE started_at >= :lo AND started_at < :hi RETURNING *"  # noqa: S608
)


async def create_partition(session: AsyncSession, month: date) -> None:
    """Create `month`'s partition; rows of that month already in the default partition are moved
    into it first (attaching checks the default holds none of the new partition's rows)."""
    name = partition_name(month)
    window = {"lo": month_start(month), "hi": month_start(add_months(month, 1))}
    await session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    stray = await has_default(session) and bool((await session.execute(_STRAY, window)).scalar_one())
    if not stray:
        await session.execute(text(f"CREATE TABLE {name} PARTITION OF {PARENT} {bounds_sql(month)}"))
        return
    like = f"LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
    await session.execute(text(f"CREATE TABLE {name} ({like})"))
    moved = f"WITH moved AS ({_MOVE.text}) INSERT INTO {name} SELECT * FROM moved"  # noqa: S608
    await session.execute(text(moved), window)
    await session.execute(text(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} {bounds_sql(month)}"))


async def ensure_partitions(session: AsyncSession, now: datetime, ahead: int = AHEAD_MONTHS) -> int:
    """Sweep job: the current month's partition and the next `ahead` months' exist. Returns how
    many it created. Serialised across workers by a transaction-scoped advisory lock."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MAINTENANCE_LOCK})
    have = {p.month for p in await monthly_partitions(session)}
    first = month_of(now)
    created = 0
    for n in range(ahead + 1):
        month = add_months(first, n)
        if month not in have:
            await create_partition(session, month)
            created += 1
    return created


def started_bounds(start: datetime | None, end: datetime | None) -> tuple[datetime | None, datetime | None]:
    """The `started_at` range holding every log settled in `[start, end)` (see SETTLE_WINDOW)."""
    return (start - SETTLE_WINDOW if start is not None else None, end)

"""Retention of raw usage logs (issue 18): whole months retired by dropping their partition.

A month is retired once all of it is older than USAGE_RETENTION_DAYS (default 400): its
partition's upper bound is at or before `now - retention`. Never a row-by-row DELETE: the
partition is detached and dropped, which costs the same for ten rows or ten million (a catalog
change and unlinking the files). Rollups are kept forever, so summaries, timeseries and platform
stats stay correct for retired months.

"Only after the rollups have all their counts": a log is counted in the rollups by the very
statement that settles it (`tools/metering.py`, `rollups.ROLLUP_CTES`), so a month whose logs
are all settled is fully counted. A month still holding a `pending` log is skipped (the stale
call sweep closes it, counting it, and a later pass retires the month).

With USAGE_ARCHIVE_DIR set, the month is archived first (`archive.py`) on a connection of its
own, and dropped only when the archive verified; a failed archive leaves the month in place and
the job reports the failure (the sweep logs it and tries again at the next pass).

Each retired month is recorded in `usage_retirements` (rows, archive path, when): history and
export answer a range reaching before the newest retired month's end with a notice
(`retired_notice`). Rows of a retired month that the DEFAULT partition caught (a clock far off)
are deleted with it, in one bounded statement — there are none in normal running.

At most MAX_MONTHS_PER_PASS months per pass, each DDL under a short lock_timeout: the first
pass after enabling retention on an old hub does not hold the parent's lock for long.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from joyhub.core import metrics
from joyhub.core.config import Settings
from joyhub.usage import partitions
from joyhub.usage.archive import archive_month
from joyhub.usage.partitions import DEFAULT, PARENT, Partition, add_months

log = logging.getLogger("joyhub.usage.retention")

MAX_MONTHS_PER_PASS = 3
STRAY_BATCH = 10_000

_PENDING = "SELECT EXISTS (SELECT 1 FROM {name} WHERE status = 'pending')"
_RECORD = text(
    """
    INSERT INTO usage_retirements (month, rows, archive_path, retired_at)
    VALUES (:month, :rows, :archive_path, :now)
    ON CONFLICT (month) DO UPDATE SET rows = usage_retirements.rows + EXCLUDED.rows,
        archive_path = COALESCE(EXCLUDED.archive_path, usage_retirements.archive_path),
        retired_at = EXCLUDED.retired_at
    """
)
_STRAYS = text(
    f"""
    DELETE FROM {DEFAULT} WHERE ctid IN (
        SELECT ctid FROM {DEFAULT} WHERE started_at >= :lo AND started_at < :hi LIMIT :batch)
    """  # noqa: S608 (our own table name; values bound)
)
_HORIZON = text("SELECT max(month) FROM usage_retirements")


@dataclass(frozen=True)
class Retired:
    month: date
    rows: int
    archive_path: str | None


def expired(parts: list[Partition], now: datetime, retention_days: int) -> list[Partition]:
    """The monthly partitions wholly older than the retention, oldest first."""
    cutoff = now - timedelta(days=retention_days)
    return [p for p in parts if p.end <= cutoff]


async def _prepare(session: AsyncSession, part: Partition, settings: Settings) -> Retired | None:
    """Check, count and archive (when configured) one month, before any DDL: the archive reads
    on a connection of its own, which our transaction must not yet block with the parent's
    lock. None when the month still has pending calls."""
    name = part.name
    if (await session.execute(text(_PENDING.format(name=name)))).scalar_one():
        log.info("month still has pending calls; retired later", extra={"partition": name})
        return None
    rows = int((await session.execute(text(f"SELECT count(*) FROM {name}"))).scalar_one())  # noqa: S608
    archive_path = None
    if settings.usage_archive_dir is not None:
        engine = session.bind
        assert isinstance(engine, AsyncEngine)
        async with engine.connect() as conn:
            archived = await archive_month(conn, part.month, settings.usage_archive_dir, progress=False)
        archive_path = str(archived.path)
    return Retired(part.month, rows, archive_path)


async def _drop(session: AsyncSession, part: Partition, ready: Retired, now: datetime) -> int:
    """Detach and drop the month's partition, delete its strays in the default, record it."""
    await session.execute(text(f"SET LOCAL lock_timeout = '{partitions.LOCK_TIMEOUT}'"))
    await session.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {part.name}"))
    await session.execute(text(f"DROP TABLE {part.name}"))
    rows = ready.rows
    if await partitions.has_default(session):
        strays = await session.execute(_STRAYS, {"lo": part.start, "hi": part.end, "batch": STRAY_BATCH})
        rows += int(getattr(strays, "rowcount", 0) or 0)
    params = {"month": part.month, "rows": rows, "archive_path": ready.archive_path, "now": now}
    await session.execute(_RECORD, params)
    metrics.USAGE_MONTHS_RETIRED.inc()
    log.info(
        "usage month retired", extra={"partition": part.name, "rows": rows, "archive": ready.archive_path}
    )
    return rows


async def retire_expired(session: AsyncSession, settings: Settings, now: datetime) -> int:
    """Sweep job: retire the expired months (a few per pass, oldest first; a month with pending
    calls stops the pass, so the retired months stay one contiguous run); returns the rows
    retired. Every month is checked and archived first, then all are dropped."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": partitions.MAINTENANCE_LOCK})
    parts = expired(await partitions.monthly_partitions(session), now, settings.usage_retention_days)
    ready: list[tuple[Partition, Retired]] = []
    for part in parts[:MAX_MONTHS_PER_PASS]:
        done = await _prepare(session, part, settings)
        if done is None:
            break
        ready.append((part, done))
    return sum([await _drop(session, part, done, now) for part, done in ready])


async def retired_before(session: AsyncSession) -> datetime | None:
    """The start of the oldest month still kept, when any month was retired: raw records of
    settle times before it may be gone (a month's last calls may have settled in the next)."""
    newest = (await session.execute(_HORIZON)).scalar_one_or_none()
    return None if newest is None else partitions.month_start(add_months(newest, 1))


def retired_notice(horizon: datetime) -> str:
    return (
        f"Raw usage records from before {horizon.date().isoformat()} were retired "
        "(USAGE_RETENTION_DAYS); summaries and timeseries still count them."
    )


async def notice_for(session: AsyncSession, start: datetime | None) -> str | None:
    """The notice for a history or export range starting at `start` (None: from the beginning)."""
    horizon = await retired_before(session)
    # a log admitted before the horizon may have settled up to SETTLE_WINDOW after it
    if horizon is None or (start is not None and start >= horizon + partitions.SETTLE_WINDOW):
        return None
    return retired_notice(horizon)

"""Archives of raw usage logs (issue 18): one month to one gzip CSV file.

`joyhub usage archive --month YYYY-MM [--out DIR]` writes `usage_logs-YYYY-MM.csv.gz`; retention
writes the same file into USAGE_ARCHIVE_DIR before it drops a month (`retention.py`).

The file: CSV as PostgreSQL's COPY writes it (LF line ends, UTF-8, fields quoted when needed),
gzip-compressed, one header line, then one line per log of the month (by admission time,
`started_at`), oldest first. Columns, in order (ARCHIVE_COLUMNS):

    id, started_at, timestamp, user_id, tool_id, tool_name, subscription_id, plan_code, status,
    tokens_used, tokens_reserved, token_source, duration_ms, request_id, error_code

Timestamps are PostgreSQL's ISO 8601 form in UTC (`2026-12-01 00:01:00+00`: the session's time
zone is UTC); empty cells are NULLs; `tool_name` is the catalog name at the time of archiving
(it survives a tool's deletion). Raw values, no spreadsheet-formula escaping: it is a data file
for reloading (`COPY … FROM PROGRAM 'zcat …' CSV HEADER` into a table of these columns), not a
download for a spreadsheet.

How: `COPY (SELECT …) TO STDOUT (FORMAT csv)` streamed from the server (PostgreSQL renders the
CSV; nothing is held but a ~1 MiB buffer) in one REPEATABLE READ transaction, so the count taken
first and the rows streamed after see the same snapshot. Compression runs in a worker thread, a
buffer at a time, so a sweep archiving inside `serve` does not stall the event loop.
The file is written as `….partial`, read back and its CSV records counted; only when that count
equals the database's is it renamed into place (an interrupted archive never leaves a file that
looks complete).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from joyhub.usage.partitions import add_months, month_start

ARCHIVE_COLUMNS = (
    "id",
    "started_at",
    "timestamp",
    "user_id",
    "tool_id",
    "tool_name",
    "subscription_id",
    "plan_code",
    "status",
    "tokens_used",
    "tokens_reserved",
    "token_source",
    "duration_ms",
    "request_id",
    "error_code",
)
BATCH = 10_000

_COUNT = text(
    """
    SELECT count(*), coalesce(sum(tokens_used), 0) FROM usage_logs
    WHERE started_at >= :lo AND started_at < :hi
    """
)
# COPY's query: asyncpg binds $1/$2; the column names are the header (ARCHIVE_COLUMNS)
_COPY = """
    SELECT u.id, u.started_at, u."timestamp", u.user_id, u.tool_id, t.name AS tool_name,
           u.subscription_id, u.plan_code, u.status, u.tokens_used, u.tokens_reserved,
           u.token_source, u.duration_ms, u.request_id, u.error_code
    FROM usage_logs AS u LEFT JOIN tools AS t ON t.id = u.tool_id
    WHERE u.started_at >= $1 AND u.started_at < $2
    ORDER BY u.started_at, u.id
"""
FLUSH_BYTES = 1 << 20


class ArchiveError(Exception):
    """The archive could not be written or did not verify; no file was left in place."""


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    rows: int
    tokens: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float(self.rows)


def archive_name(month: date) -> str:
    return f"usage_logs-{month:%Y-%m}.csv.gz"


def parse_month(value: str) -> date:
    """`YYYY-MM` → the first of that month; ValueError otherwise."""
    try:
        parsed = datetime.strptime(value, "%Y-%m")
    except ValueError:
        raise ValueError(f"--month must be YYYY-MM, got {value!r}") from None
    return parsed.date().replace(day=1)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, label: str, out: IO[str] | None = None, *, enabled: bool = True) -> None:
        self.total, self.label, self.out, self.enabled = total, label, out or sys.stderr, enabled
        self.began = time.monotonic()
        self._last_tenth = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        share = done / self.total if self.total else 1.0
        rate = done / max(time.monotonic() - self.began, 1e-9)
        bar = "#" * int(share * 30)
        line = f"{self.label} [{bar:<30}] {share:4.0%} {done:,}/{self.total:,} rows {rate:,.0f} rows/s"
        if self.out.isatty():
            self.out.write("\r" + line)
        elif int(share * 10) != self._last_tenth:
            self._last_tenth = int(share * 10)
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.enabled and self.out.isatty():
            self.out.write("\n")
            self.out.flush()


def count_lines(path: Path) -> int:
    """Data lines of an archive (CSV records, so a quoted newline inside a cell is not counted)."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        return sum(1 for _ in reader)


class _GzipSink:
    """COPY's output chunks, buffered to ~1 MiB and compressed in a worker thread."""

    def __init__(self, fh: gzip.GzipFile, bar: Progress) -> None:
        self.fh, self.bar = fh, bar
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.lines = 0  # newlines seen: the progress (a quoted newline in a cell would count too)

    async def __call__(self, chunk: bytes) -> None:
        self.buffer.append(chunk)
        self.buffered += len(chunk)
        self.lines += chunk.count(b"\n")
        if self.buffered >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.buffer:
            data, self.buffer, self.buffered = b"".join(self.buffer), [], 0
            await asyncio.to_thread(self.fh.write, data)
            self.bar.update(max(self.lines - 1, 0))


async def archive_month(
    conn: AsyncConnection, month: date, out_dir: Path, *, progress: bool = True
) -> ArchiveResult:
    """Write `month`'s logs to `out_dir/usage_logs-YYYY-MM.csv.gz` and verify its row count.

    `conn` must not be in a transaction: this opens its own REPEATABLE READ one. PostgreSQL
    renders the CSV itself (`COPY (SELECT …) TO STDOUT`, streamed): several times faster than
    encoding rows in Python."""
    began = time.monotonic()
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    final = out_dir / archive_name(month)
    partial = final.with_name(final.name + ".partial")
    window = {"lo": month_start(month), "hi": month_start(add_months(month, 1))}
    async with conn.begin():
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        expected, tokens = (await conn.execute(_COUNT, window)).one()
        bar = Progress(int(expected), f"usage {month:%Y-%m}", enabled=progress)
        fh = await asyncio.to_thread(gzip.open, partial, "wb", 6)
        try:
            sink = _GzipSink(fh, bar)
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.copy_from_query(
                _COPY, window["lo"], window["hi"], output=sink, format="csv", header=True
            )
            await sink.flush()
        except BaseException:
            await asyncio.to_thread(fh.close)
            partial.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        await asyncio.to_thread(fh.close)
    read_back = await asyncio.to_thread(count_lines, partial)
    if read_back != int(expected):
        partial.unlink(missing_ok=True)
        raise ArchiveError(
            f"archive of {month:%Y-%m} did not verify: "
            f"{expected} rows in the database, {read_back} in the file"
        )
    partial.replace(final)
    return ArchiveResult(final, int(expected), int(tokens), time.monotonic() - began)

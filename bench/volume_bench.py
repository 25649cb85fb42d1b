"""Usage data at volume (issue 18): retiring a month, archiving it, migrating a big table.

    .venv/bin/python bench/volume_bench.py [--rows 1000000] [--migration-rows 2000000]

On a fresh database `joyhub_bench_<random>` of `--pg-url` (dropped at the end):

1. **Retire a month**: two months of `--rows` logs each in their partitions. Month A is retired
   the way retention does it (DETACH + DROP of its partition); month B is emptied with a
   DELETE of the same number of rows (what a hub without partitions would have to do) — same
   run, same data shape, so the ratio is the figure.
2. **Archive**: month B is archived first (`joyhub usage archive`'s code) → rows/s and file size.
3. **Migration**: a database at revision 0011 with `--migration-rows` logs in the unpartitioned
   table, migrated to 0013 → seconds and rows/s (the progress lines go to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from joyhub.core.migrations import migrate_async
from joyhub.usage.archive import archive_month

USER = "00000000-0000-0000-0000-0000000000aa"
TOOL = "00000000-0000-0000-0000-0000000000bb"
SEED = [
    f"""INSERT INTO users (id, email, password_hash, name, role, is_active, created_at, updated_at)
        VALUES ('{USER}', 'bench@example.com', 'x', 'B', 'user', true, now(), now())""",
    f"""INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts, is_active,
                           created_at, updated_at)
        VALUES ('{TOOL}', 'bench-tool', 'd', 'http://127.0.0.1:9/', 5, 1, true, now(), now())""",
]


def _fill(rows: int, month_start: str) -> str:
    """`rows` settled logs spread over the month starting at `month_start` (27 days)."""
    step = 27 * 86400 / max(rows, 1)
    return f"""
        INSERT INTO usage_logs (id, user_id, tool_id, plan_code, status, started_at, "timestamp",
                                tokens_used, tokens_reserved, token_source, duration_ms, request_id)
        SELECT gen_random_uuid(), '{USER}', '{TOOL}', 'pro', 'success',
               timestamptz '{month_start}' + g * interval '{step} seconds',
               timestamptz '{month_start}' + g * interval '{step} seconds' + interval '50 ms',
               g % 97, 0, 'reported', 120, 'req-' || g
        FROM generate_series(1, {rows}) AS g
    """


async def _database(admin_url: str) -> str:
    name = f"joyhub_bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def _drop(admin_url: str, url: str) -> None:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    await admin.dispose()


async def retire_and_archive(admin_url: str, rows: int) -> dict[str, float]:
    url = await _database(admin_url)
    try:
        await migrate_async(url)
        eng = create_async_engine(url)
        async with eng.begin() as conn:
            for sql in SEED:
                await conn.execute(text(sql))
            for month in ("2030-01", "2030-02"):
                lo, hi = f"{month}-01", "2030-02-01" if month == "2030-01" else "2030-03-01"
                name = f"usage_logs_p{month.replace('-', '')}"
                await conn.execute(
                    text(f"CREATE TABLE {name} PARTITION OF usage_logs FOR VALUES FROM ('{lo}') TO ('{hi}')")
                )
        began = time.perf_counter()
        async with eng.begin() as conn:
            await conn.execute(text(_fill(rows, "2030-01-01")))
            await conn.execute(text(_fill(rows, "2030-02-01")))
        fill = time.perf_counter() - began
        with tempfile.TemporaryDirectory() as tmp:
            async with eng.connect() as conn:
                archived = await archive_month(conn, date(2030, 2, 1), Path(tmp))
            size = archived.path.stat().st_size
        began = time.perf_counter()
        async with eng.begin() as conn:
            await conn.execute(text("ALTER TABLE usage_logs DETACH PARTITION usage_logs_p203001"))
            await conn.execute(text("DROP TABLE usage_logs_p203001"))
        drop = time.perf_counter() - began
        began = time.perf_counter()
        async with eng.begin() as conn:
            deleted = await conn.execute(
                text("DELETE FROM usage_logs WHERE started_at >= '2030-02-01' AND started_at < '2030-03-01'")
            )
        delete = time.perf_counter() - began
        began = time.perf_counter()
        async with eng.connect() as conn:  # what the DELETE left for later: the dead rows
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM usage_logs_p203002"))
        vacuum = time.perf_counter() - began
        await eng.dispose()
        return {
            "rows_per_month": rows,
            "fill_seconds": round(fill, 1),
            "drop_partition_seconds": round(drop, 4),
            "delete_seconds": round(delete, 2),
            "deleted_rows": deleted.rowcount,
            "delete_over_drop": round(delete / drop, 1),
            "vacuum_after_delete_seconds": round(vacuum, 2),
            "archive_seconds": round(archived.seconds, 2),
            "archive_rows_per_second": round(archived.rows_per_second),
            "archive_bytes": size,
        }
    finally:
        await _drop(admin_url, url)


async def migration(admin_url: str, rows: int) -> dict[str, float]:
    url = await _database(admin_url)
    try:
        await migrate_async(url, "0011")
        eng = create_async_engine(url)
        async with eng.begin() as conn:
            for sql in SEED:
                await conn.execute(text(sql))
            per_month = rows // 10
            for m in range(10):
                await conn.execute(text(_fill(per_month, f"2029-{m + 1:02d}-01")))
        async with eng.connect() as conn:
            size = (await conn.execute(text("SELECT pg_total_relation_size('usage_logs')"))).scalar_one()
        await eng.dispose()
        began = time.perf_counter()
        await migrate_async(url, "0013")
        up = time.perf_counter() - began
        began = time.perf_counter()
        await migrate_async(url, "0011")
        down = time.perf_counter() - began
        # back on the unpartitioned table: what retiring one month of it by DELETE costs
        eng = create_async_engine(url)
        began = time.perf_counter()
        async with eng.begin() as conn:
            await conn.execute(
                text("DELETE FROM usage_logs WHERE started_at >= '2029-01-01' AND started_at < '2029-02-01'")
            )
        unpartitioned_delete = time.perf_counter() - began
        await eng.dispose()
        return {
            "rows": per_month * 10,
            "table_bytes": int(size),
            "upgrade_seconds": round(up, 1),
            "upgrade_rows_per_second": round(per_month * 10 / up),
            "downgrade_seconds": round(down, 1),
            "unpartitioned_delete_one_month_seconds": round(unpartitioned_delete, 2),
            "unpartitioned_delete_rows": per_month,
        }
    finally:
        await _drop(admin_url, url)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--migration-rows", type=int, default=2_000_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    results = {
        "load_average_at_start": [round(x, 2) for x in load],
        "retire": await retire_and_archive(args.pg_url, args.rows),
        "migration": await migration(args.pg_url, args.migration_rows),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

"""Seed a database with usage data at scale, for bench/usage_bench.py.

    python bench/seed_usage.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/joyhub_bench \
        --users 10000 --logs 10000000 --heavy-user-logs 1000000

What it writes (after migrating the database to head and emptying the data tables):
- a few tools (one of them soft-deleted, so history keeps a deleted tool's name), `--users` users
  (`heavy@bench.joyhub.test` holds `--heavy-user-logs` of the logs, `admin@bench.joyhub.test` is
  an admin), API keys for some users, and a subscription for most users (current period started
  within the last 30 days; most active, some cancelled or expired);
- `--logs` settled usage logs spread over `--days` days ending now, in time order (as a live
  table would be written), with a mild growth trend, a skewed per-user activity (exponential
  weights) and ~94 % success / 4.5 % error / 1.5 % timeout, plus a few `pending` rows;
- the read models (`usage_daily`, `usage_hourly`, `usage_user_daily`, `usage_user_weekly`,
  `usage_platform_daily`), computed from the raw rows in SQL after the COPY
  (`INSERT … SELECT … GROUP BY … ORDER BY day`, so each table is laid out by day as a live table
  written day after day would be);
- each active subscription's `tokens_used` equal to the sum of its current period's logs (the
  accounting invariant).

Speed: the raw rows go in with asyncpg's binary COPY (`copy_records_to_table`) in one batch per
day, with the table's indexes dropped during the load and rebuilt afterwards (from their own
definitions, so indexes added by later migrations are kept), and foreign-key triggers skipped
(`session_replication_role = replica`, the data is consistent by construction). A progress line
shows rows, rate and ETA.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HEAVY_EMAIL = "heavy@bench.joyhub.test"
ADMIN_EMAIL = "admin@bench.joyhub.test"
PASSWORD_HASH = "$2b$12$" + "x" * 53  # not a valid bcrypt hash: bench users never log in

TOOL_NAMES = [
    "Summarizer",
    "Translator",
    "Code Explainer",
    "Image Captioner",
    "Sentiment",
    "Keyword Extractor",
    "Grammar Fixer",
    "Retired Tool",  # soft-deleted below
]
PLANS = [("free", 0.45), ("pro", 0.45), ("enterprise", 0.10)]
LOG_COLUMNS = [
    "id",
    "user_id",
    "tool_id",
    "subscription_id",
    "plan_code",
    "status",
    "started_at",
    "timestamp",
    "tokens_used",
    "tokens_reserved",
    "duration_ms",
    "request_id",
    "error_code",
]
DATA_TABLES = [
    "idempotency_keys",
    "usage_logs",
    "usage_daily",
    "usage_hourly",
    "usage_user_daily",
    "usage_user_weekly",
    "usage_platform_daily",
    "audit_logs",
    "api_keys",
    "refresh_tokens",
    "password_reset_tokens",
    "auth_sessions",
    "subscriptions",
    "throttle_hits",
    "tools",
    "users",
]


def asyncpg_dsn(url: str) -> str:
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    return "postgresql+asyncpg://" + asyncpg_dsn(url).split("://", 1)[1]


class Progress:
    """One self-overwriting line: done/total, rate and ETA."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= 0.5 or self.done >= self.total:
            self._last = now
            elapsed = max(now - self.started, 1e-6)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else 0
            pct = 100 * self.done / max(self.total, 1)
            print(
                f"\r  {self.label}: {self.done:,}/{self.total:,} ({pct:5.1f}%) "
                f"{rate:,.0f} rows/s, elapsed {elapsed:,.0f}s, ETA {eta:,.0f}s   ",
                end="",
                flush=True,
            )

    def finish(self) -> None:
        print()


def step(message: str) -> float:
    print(f"- {message}", flush=True)
    return time.monotonic()


def done(started: float) -> None:
    print(f"  done in {time.monotonic() - started:,.1f}s", flush=True)


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY CASCADE")


async def seed_catalog(
    conn: asyncpg.Connection, args: argparse.Namespace, rng: random.Random, now: datetime
) -> dict[str, Any]:
    """Tools, users, API keys and subscriptions; returns what the log generator needs."""
    tools = [uuid.uuid4() for _ in TOOL_NAMES]
    await conn.copy_records_to_table(
        "tools",
        columns=[
            "id",
            "name",
            "description",
            "category",
            "api_endpoint",
            "timeout_seconds",
            "max_attempts",
            "is_active",
            "deleted_at",
            "created_at",
            "updated_at",
        ],
        records=[
            (
                tid,
                name,
                f"{name} (bench)",
                "bench",
                "http://127.0.0.1:9/bench",
                30,
                3,
                name != "Retired Tool",
                now - timedelta(days=30) if name == "Retired Tool" else None,
                now - timedelta(days=400),
                now - timedelta(days=400),
            )
            for tid, name in zip(tools, TOOL_NAMES, strict=True)
        ],
    )

    n = args.users
    users = [uuid.uuid4() for _ in range(n)]
    emails = [
        HEAVY_EMAIL if i == 0 else ADMIN_EMAIL if i == 1 else f"user{i:05d}@bench.joyhub.test"
        for i in range(n)
    ]
    created = [now - timedelta(days=args.days + 10, seconds=rng.randrange(86400 * 30)) for _ in range(n)]
    await conn.copy_records_to_table(
        "users",
        columns=[
            "id",
            "name",
            "email",
            "password_hash",
            "role",
            "is_active",
            "last_login_at",
            "created_at",
            "updated_at",
        ],
        records=[
            (
                users[i],
                "Heavy User" if i == 0 else "Bench Admin" if i == 1 else f"Bench User {i}",
                emails[i],
                PASSWORD_HASH,
                "admin" if i == 1 else "user",
                i < 2 or rng.random() > 0.02,
                now - timedelta(seconds=rng.randrange(86400 * 60)),
                created[i],
                created[i],
            )
            for i in range(n)
        ],
    )

    keys = []
    for i in range(n):
        for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
            keys.append(
                (
                    uuid.uuid4(),
                    users[i],
                    "bench key",
                    "jfui_" + os.urandom(4).hex()[:7],
                    os.urandom(32),
                    rng.random() > 0.2,
                    created[i],
                )
            )
    await conn.copy_records_to_table(
        "api_keys",
        columns=["id", "user_id", "name", "key_prefix", "key_hash", "is_active", "created_at"],
        records=keys,
    )

    subs: dict[int, tuple[uuid.UUID, str, float]] = {}  # user index -> (sub id, plan, period start epoch)
    sub_rows = []
    for i in range(n):
        if i > 1 and rng.random() < 0.05:
            continue  # never subscribed, never invoked
        plan = "enterprise" if i == 0 else rng.choices([p for p, _ in PLANS], [w for _, w in PLANS])[0]
        roll = rng.random()
        status = "active" if i < 2 or roll < 0.85 else "cancelled" if roll < 0.95 else "expired"
        start = now - timedelta(seconds=rng.randrange(1, 86400 * 30))
        sid = uuid.uuid4()
        subs[i] = (sid, plan, start.timestamp() if status == "active" else math.inf)
        sub_rows.append(
            (sid, users[i], plan, status, 0, 0, 0, start, start + timedelta(days=30), False, created[i], now)
        )
    await conn.copy_records_to_table(
        "subscriptions",
        columns=[
            "id",
            "user_id",
            "plan_code",
            "status",
            "tokens_used",
            "tokens_reserved",
            "inflight",
            "current_period_start",
            "current_period_end",
            "cancel_at_period_end",
            "created_at",
            "updated_at",
        ],
        records=sub_rows,
    )
    return {"tools": tools, "users": users, "subs": subs}


async def table_indexes(conn: asyncpg.Connection, table: str) -> tuple[list[str], list[str]]:
    """(drop, create) statements for a table's indexes, PK/unique constraints and the foreign keys
    that point at them (dropped first, recreated last)."""
    drops, creates, refs_drop, refs_create = [], [], [], []
    for row in await conn.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def "
        "FROM pg_constraint WHERE confrelid = $1::regclass AND contype = 'f' AND conrelid <> confrelid",
        table,
    ):
        refs_drop.append(f'ALTER TABLE {row["tbl"]} DROP CONSTRAINT "{row["conname"]}"')
        refs_create.append(f'ALTER TABLE {row["tbl"]} ADD CONSTRAINT "{row["conname"]}" {row["def"]}')
    for row in await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
        "WHERE conrelid = $1::regclass AND contype IN ('p', 'u')",
        table,
    ):
        drops.append(f'ALTER TABLE {table} DROP CONSTRAINT "{row["conname"]}"')
        creates.append(f'ALTER TABLE {table} ADD CONSTRAINT "{row["conname"]}" {row["def"]}')
    for row in await conn.fetch(
        "SELECT i.relname AS name, pg_get_indexdef(i.oid) AS def FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = $1::regclass AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid)",
        table,
    ):
        drops.append(f'DROP INDEX "{row["name"]}"')
        # an index of a partitioned table reads back as `ON ONLY parent`, which would build it on
        # the parent alone, invalid and with no partition's index: rebuild it on every partition
        creates.append(row["def"].replace(" ON ONLY ", " ON ", 1))
    return refs_drop + drops, creates + refs_create


def day_weights(days: int) -> list[float]:
    """A mild growth trend over the period (the last day has ~3x the first's traffic)."""
    raw = [0.5 + d / max(days - 1, 1) for d in range(days)]
    total = sum(raw)
    return [w / total for w in raw]


async def seed_logs(
    conn: asyncpg.Connection,
    args: argparse.Namespace,
    rng: random.Random,
    now: datetime,
    catalog: dict[str, Any],
) -> dict[int, int]:
    """COPY the raw logs day by day in time order; return tokens per active current period."""
    users: list[uuid.UUID] = catalog["users"]
    subs: dict[int, tuple[uuid.UUID, str, float]] = catalog["subs"]
    tools: list[uuid.UUID] = catalog["tools"]
    invokers = [i for i in subs if i != 1]  # the admin does not invoke
    heavy = 0
    others = [i for i in invokers if i != heavy]
    raw_weights = [rng.expovariate(1.0) for _ in others]
    other_total = max(args.logs - args.heavy_user_logs, 0)
    heavy_share = args.heavy_user_logs / max(args.logs, 1)
    scale = (1 - heavy_share) / sum(raw_weights)
    population = [heavy, *others]
    cum: list[float] = []
    acc = 0.0
    for w in [heavy_share, *(w * scale for w in raw_weights)]:
        acc += w
        cum.append(acc)
    del other_total

    tool_weights = [30, 20, 15, 10, 10, 8, 5, 2]
    tool_cum = []
    acc = 0.0
    for w in tool_weights:
        acc += w
        tool_cum.append(acc)
    period_tokens: dict[int, int] = {}

    start_epoch = (now - timedelta(days=args.days)).timestamp()
    per_day = day_weights(args.days)
    progress = Progress("usage_logs", args.logs)
    random_ = rng.random
    getrandbits = rng.getrandbits
    expovariate = rng.expovariate
    fromts = datetime.fromtimestamp
    uuid4 = uuid.uuid4
    remaining = args.logs
    for d in range(args.days):
        n = remaining if d == args.days - 1 else min(remaining, round(args.logs * per_day[d]))
        remaining -= n
        if n <= 0:
            continue
        day0 = start_epoch + d * 86400
        secs = sorted(random_() * 86400 for _ in range(n))
        who = rng.choices(population, cum_weights=cum, k=n)
        which = rng.choices(tools, cum_weights=tool_cum, k=n)
        records = []
        append = records.append
        for k in range(n):
            ts = day0 + secs[k]
            u = who[k]
            sid, plan, pstart = subs[u]
            r = random_()
            duration = int(expovariate(0.0025)) + 5
            if r < 0.94:
                status, tokens, code = "success", int(expovariate(0.004)) + 1, None
                if ts >= pstart:
                    period_tokens[u] = period_tokens.get(u, 0) + tokens
            elif r < 0.985:
                status, tokens, code = "error", 0, "TOOL_UNAVAILABLE"
            else:
                status, tokens, code = "timeout", 0, "TOOL_TIMEOUT"
            append(
                (
                    uuid4(),
                    users[u],
                    which[k],
                    sid,
                    plan,
                    status,
                    fromts(ts - duration / 1000, UTC),
                    fromts(ts, UTC),
                    tokens,
                    0,
                    duration,
                    f"{getrandbits(64):016x}",
                    code,
                )
            )
        await conn.copy_records_to_table("usage_logs", columns=LOG_COLUMNS, records=records)
        progress.add(n)
    progress.finish()

    # a few invocations still in flight: never shown, never counted
    pending = []
    for _ in range(20):
        u = rng.choice(invokers)
        sid, plan, _p = subs[u]
        ts = now - timedelta(seconds=rng.randrange(1, 60))
        pending.append(
            (
                uuid4(),
                users[u],
                tools[0],
                sid,
                plan,
                "pending",
                ts,
                ts,
                0,
                100,
                None,
                f"{getrandbits(64):016x}",
                None,
            )
        )
    await conn.copy_records_to_table("usage_logs", columns=LOG_COLUMNS, records=pending)
    return period_tokens


ROLLUP_DAILY = """
INSERT INTO usage_daily (user_id, day, tool_id, plan_code, invocations, successes, errors, timeouts, tokens)
SELECT user_id, (timestamp AT TIME ZONE 'UTC')::date, tool_id, coalesce(plan_code, ''),
       count(*), count(*) FILTER (WHERE status = 'success'), count(*) FILTER (WHERE status = 'error'),
       count(*) FILTER (WHERE status = 'timeout'), sum(tokens_used)
FROM usage_logs WHERE status <> 'pending'
GROUP BY 1, 2, 3, 4
ORDER BY 2, 1
"""
ROLLUP_HOURLY = """
INSERT INTO usage_hourly (user_id, hour, invocations, tokens)
SELECT user_id, date_trunc('hour', timestamp AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       count(*), sum(tokens_used)
FROM usage_logs WHERE status <> 'pending'
GROUP BY 1, 2
ORDER BY 2, 1
"""
# the next three come from usage_daily (what migration 0003's backfill does)
ROLLUP_USER_DAILY = """
INSERT INTO usage_user_daily (user_id, day, invocations, tokens)
SELECT user_id, day, sum(invocations), sum(tokens) FROM usage_daily
GROUP BY 1, 2
ORDER BY 2, 1
"""
ROLLUP_USER_WEEKLY = """
INSERT INTO usage_user_weekly (user_id, week, invocations, tokens)
SELECT user_id, date_trunc('week', day::timestamp)::date, sum(invocations), sum(tokens) FROM usage_daily
GROUP BY 1, 2
ORDER BY 2, 1
"""
ROLLUP_PLATFORM_DAILY = """
INSERT INTO usage_platform_daily
    (day, tool_id, plan_code, shard, invocations, successes, errors, timeouts, tokens)
SELECT day, tool_id, plan_code, ('x' || right(user_id::text, 1))::bit(4)::int,
       sum(invocations), sum(successes), sum(errors), sum(timeouts), sum(tokens)
FROM usage_daily
GROUP BY 1, 2, 3, 4
ORDER BY 1
"""

ROLLUP_TABLES = (
    "usage_daily",
    "usage_hourly",
    "usage_user_daily",
    "usage_user_weekly",
    "usage_platform_daily",
)
ROLLUPS = (ROLLUP_DAILY, ROLLUP_HOURLY, ROLLUP_USER_DAILY, ROLLUP_USER_WEEKLY, ROLLUP_PLATFORM_DAILY)


async def main_async(args: argparse.Namespace) -> None:
    url = args.database_url
    rng = random.Random(args.seed)
    now = datetime.now(UTC).replace(microsecond=0)
    begun = time.monotonic()

    t = step("migrating to head")
    from joyhub.core.migrations import migrate_async

    await migrate_async(sqlalchemy_url(url))
    done(t)

    conn: asyncpg.Connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("SET session_replication_role = replica")  # skip FK triggers during the load
        await conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        await conn.execute(f"SET work_mem = '{args.work_mem}'")
        await conn.execute("SET timezone = 'UTC'")

        # one transaction: a failed or interrupted seed leaves the database as it was (indexes too)
        async with conn.transaction():
            t = step("emptying data tables")
            await reset(conn)
            done(t)

            t = step(f"users ({args.users:,}), tools, API keys, subscriptions")
            catalog = await seed_catalog(conn, args, rng, now)
            done(t)

            saved: dict[str, list[str]] = {}
            t = step("dropping the indexes of usage_logs and the rollups for the load")
            for table in ("usage_logs", *ROLLUP_TABLES):
                drops, creates = await table_indexes(conn, table)
                saved[table] = creates
                for sql in drops:
                    await conn.execute(sql)
            done(t)

            t = step(f"usage_logs ({args.logs:,} over {args.days} days, heavy user {args.heavy_user_logs:,})")
            period_tokens = await seed_logs(conn, args, rng, now, catalog)
            done(t)

            t = step("rebuilding usage_logs indexes")
            for sql in saved["usage_logs"]:
                await conn.execute(sql)
            done(t)

            for table, sql in zip(ROLLUP_TABLES, ROLLUPS, strict=True):
                t = step(f"{table} rollup (INSERT ... SELECT ... GROUP BY)")
                await conn.execute(sql)
                done(t)
            t = step("rebuilding rollup indexes")
            for table in ROLLUP_TABLES:
                for sql in saved[table]:
                    await conn.execute(sql)
            done(t)

            t = step("subscriptions.tokens_used = sum of the current period's logs")
            users: list[uuid.UUID] = catalog["users"]
            await conn.executemany(
                "UPDATE subscriptions SET tokens_used = $2 WHERE user_id = $1",
                [(users[i], tokens) for i, tokens in period_tokens.items()],
            )
            done(t)

        await conn.execute("SET session_replication_role = origin")
        t = step("VACUUM ANALYZE")
        for table in (
            "usage_logs",
            *ROLLUP_TABLES,
            "users",
            "subscriptions",
            "api_keys",
            "tools",
        ):
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        done(t)

        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("users", "usage_logs", *ROLLUP_TABLES, "subscriptions")
        }
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await conn.close()
    print(f"seeded in {time.monotonic() - begun:,.0f}s: {counts}, database size {size}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="the database to (re)seed; its data tables are emptied first",
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--logs", type=int, default=10_000_000)
    parser.add_argument("--heavy-user-logs", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365, help="the logs span this many days, ending now")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work-mem", default="256MB")
    parser.add_argument("--maintenance-work-mem", default="1GB")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    if args.users < 3:
        parser.error("--users must be at least 3")
    if args.heavy_user_logs > args.logs:
        parser.error("--heavy-user-logs cannot exceed --logs")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

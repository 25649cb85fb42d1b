"""Monthly partitions of usage_logs (issue 18): created ahead by the sweep, strays moved out of
the default partition, and reads pruned to the partitions they need (EXPLAIN)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.db import make_sessionmaker
from joyhub.core.pagination import Page
from joyhub.ops.sweeper import sweep_once
from joyhub.usage import partitions, service
from joyhub.usage.dates import TimeRange
from tests.conftest import test_settings as hub_settings
from tests.factories import make_account
from tests.usage.factories import make_tool, record_invocation

pytestmark = pytest.mark.integration


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def _names(engine: AsyncEngine) -> set[str]:
    async with make_sessionmaker(engine)() as db:
        return {p.name for p in await partitions.monthly_partitions(db)}


async def _ensure(engine: AsyncEngine, now: datetime, ahead: int = partitions.AHEAD_MONTHS) -> int:
    async with make_sessionmaker(engine)() as db, db.begin():
        return await partitions.ensure_partitions(db, now, ahead)


def test_month_arithmetic_and_names() -> None:
    assert partitions.add_months(date(2030, 11, 1), 2) == date(2031, 1, 1)
    assert partitions.add_months(date(2030, 1, 1), -1) == date(2029, 12, 1)
    assert partitions.partition_name(date(2030, 3, 1)) == "usage_logs_p203003"
    assert partitions.month_of(utc(2030, 3, 31, 23, 59)) == date(2030, 3, 1)
    assert partitions.is_partition("usage_logs_p203003") and partitions.is_partition("usage_logs_default")
    assert not partitions.is_partition("usage_logs") and not partitions.is_partition("usage_daily")


async def test_the_migration_made_this_month_the_next_two_and_a_default(engine: AsyncEngine) -> None:
    this = partitions.month_of(datetime.now(UTC))
    wanted = {partitions.partition_name(partitions.add_months(this, n)) for n in range(3)}
    assert wanted <= await _names(engine)
    async with engine.connect() as conn:
        default = await conn.execute(text("SELECT to_regclass('usage_logs_default') IS NOT NULL"))
        assert default.scalar_one()


async def test_the_sweep_creates_the_current_month_and_two_ahead(engine: AsyncEngine) -> None:
    factory = make_sessionmaker(engine)
    async with factory() as db, db.begin():
        created = await partitions.ensure_partitions(db, utc(2041, 11, 20))
    assert created == 3
    assert {"usage_logs_p204111", "usage_logs_p204112", "usage_logs_p204201"} <= await _names(engine)
    assert await _ensure(engine, utc(2041, 11, 20)) == 0  # idempotent
    # and it is one of the periodic sweep's jobs
    results = await sweep_once(factory, hub_settings())
    assert results["usage_partitions"] >= 0


async def test_rows_caught_by_the_default_move_into_their_new_month(engine: AsyncEngine) -> None:
    acc = await make_account(engine)
    tool = await make_tool(engine)
    log_id = await record_invocation(engine, acc.user_id, tool, tokens=7, ts=utc(2043, 5, 3))
    assert await _home(engine, log_id) == "usage_logs_default"
    assert await _ensure(engine, utc(2043, 5, 1), ahead=0) == 1
    assert await _home(engine, log_id) == "usage_logs_p204305"


async def _home(engine: AsyncEngine, log_id: uuid.UUID) -> str:
    """The partition a log lives in."""
    async with engine.connect() as conn:
        sql = text("SELECT tableoid::regclass::text FROM usage_logs WHERE id = :i")
        return str((await conn.execute(sql, {"i": log_id})).scalar_one())


async def _plan(engine: AsyncEngine, sql: str) -> str:
    async with engine.connect() as conn:
        rows = await conn.execute(text("EXPLAIN (COSTS OFF) " + sql))
        return "\n".join(r[0] for r in rows)


def _scanned(plan: str) -> set[str]:
    return {
        word for word in plan.replace("(", " ").replace(")", " ").split() if partitions.is_partition(word)
    }


async def test_a_one_month_history_query_opens_only_the_partitions_it_needs(engine: AsyncEngine) -> None:
    await _ensure(engine, utc(2045, 1, 1), ahead=6)
    user = uuid.uuid4()

    def sql(rng: TimeRange) -> str:
        query = service.history_query(user, rng, service.LogFilter(), Page(0, 20))
        return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))

    # inside one month: that month's partition only
    mid = _scanned(await _plan(engine, sql(TimeRange(utc(2045, 3, 5), utc(2045, 3, 20)))))
    assert mid == {"usage_logs_p204503"}
    # a whole calendar month: also the previous one, for the calls admitted in its last
    # SETTLE_WINDOW and settled in this month — and nothing else
    whole = _scanned(await _plan(engine, sql(TimeRange(utc(2045, 3, 1), utc(2045, 4, 1)))))
    assert whole == {"usage_logs_p204502", "usage_logs_p204503"}


async def test_a_settle_opens_only_the_calls_partition(engine: AsyncEngine) -> None:
    """The settle statement names each log by (id, started_at) and bounds started_at."""
    await _ensure(engine, utc(2046, 1, 1), ahead=3)
    plan = await _plan(
        engine,
        "UPDATE usage_logs SET status = 'success' WHERE id = '00000000-0000-0000-0000-000000000001' "
        "AND started_at = '2046-02-10T00:00:00+00:00' AND status = 'pending'",
    )
    assert _scanned(plan) == {"usage_logs_p204602"}

"""Retention and archives of raw usage logs (issue 18): exactly the expired months are dropped,
the rollups stay what they were, history/export tell the caller, archives round-trip."""

from __future__ import annotations

import csv
import gzip
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.db import make_sessionmaker
from joyhub.usage import partitions, retention
from joyhub.usage.archive import ARCHIVE_COLUMNS, archive_month, archive_name, parse_month
from tests.conftest import test_settings as hub_settings
from tests.factories import make_account
from tests.usage.factories import make_tool, record_invocation, record_pending

pytestmark = pytest.mark.integration

URL = "/api/v1/usage"

ROLLUPS = (
    "SELECT coalesce(sum(invocations), 0), coalesce(sum(tokens), 0) FROM usage_daily",
    "SELECT coalesce(sum(invocations), 0), coalesce(sum(tokens), 0) FROM usage_hourly",
    "SELECT coalesce(sum(invocations), 0), coalesce(sum(tokens), 0) FROM usage_user_daily",
    "SELECT coalesce(sum(invocations), 0), coalesce(sum(tokens), 0) FROM usage_user_weekly",
    "SELECT coalesce(sum(invocations), 0), coalesce(sum(tokens), 0) FROM usage_platform_daily",
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def _rollups(engine: AsyncEngine) -> list[tuple[int, int]]:
    async with engine.connect() as conn:
        return [tuple((await conn.execute(text(q))).one()) for q in ROLLUPS]  # type: ignore[misc]


async def _names(engine: AsyncEngine) -> set[str]:
    async with make_sessionmaker(engine)() as db:
        return {p.name for p in await partitions.monthly_partitions(db)}


async def _retire(engine: AsyncEngine, now: datetime, **settings: object) -> int:
    """Sweep passes until one retires nothing more (other tests' months may be expired too: a
    pass retires at most MAX_MONTHS_PER_PASS)."""
    total = 0
    for _ in range(20):
        async with make_sessionmaker(engine)() as db, db.begin():
            names = {p.name for p in await partitions.monthly_partitions(db)}
            total += await retention.retire_expired(db, hub_settings(**settings), now)
        if {p.name for p in await _partitions(engine)} == names:
            return total
    return total


async def _partitions(engine: AsyncEngine) -> list[partitions.Partition]:
    async with make_sessionmaker(engine)() as db:
        return await partitions.monthly_partitions(db)


async def _seed(engine: AsyncEngine) -> tuple[Any, uuid.UUID]:
    """Calls in Jan, Feb and Mar 2051 (partitions Jan…Jun)."""
    async with make_sessionmaker(engine)() as db, db.begin():
        await partitions.ensure_partitions(db, utc(2051, 1, 1), ahead=5)
    acc = await make_account(engine)
    tool = await make_tool(engine)
    for day in (3, 17, 28):
        await record_invocation(engine, acc.user_id, tool, tokens=10, ts=utc(2051, 1, day, 12))
        await record_invocation(engine, acc.user_id, tool, tokens=20, ts=utc(2051, 2, day, 12))
        await record_invocation(engine, acc.user_id, tool, tokens=40, ts=utc(2051, 3, day, 12))
    return acc, tool


async def test_retention_drops_exactly_the_expired_months_and_keeps_the_rollups(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    acc, _tool = await _seed(engine)
    before = await _rollups(engine)
    # 400 days after 2051-03-01 00:00: January and February are wholly older, March is not
    now = utc(2052, 4, 4, 12)
    retired = await _retire(engine, now, usage_retention_days=400)
    assert retired == 6
    names = await _names(engine)
    assert "usage_logs_p205101" not in names and "usage_logs_p205102" not in names
    assert {"usage_logs_p205103", "usage_logs_p205104"} <= names
    assert await _rollups(engine) == before  # rollups kept forever
    async with engine.connect() as conn:
        kept = (await conn.execute(text("SELECT count(*), sum(tokens_used) FROM usage_logs"))).one()
        sql = "SELECT month, rows FROM usage_retirements WHERE month >= '2051-01-01' ORDER BY month"
        recorded = (await conn.execute(text(sql))).all()
    assert tuple(kept) == (3, 120)
    assert [(m.isoformat(), n) for m, n in recorded] == [("2051-01-01", 3), ("2051-02-01", 3)]
    assert await _retire(engine, now, usage_retention_days=400) == 0  # nothing more to do

    # history of a retired month: empty, with a notice; of a kept month: no notice
    r = await client.get(f"{URL}?start_date=2051-02-01&end_date=2051-02-28", headers=acc.headers)
    body = r.json()
    assert r.status_code == 200 and body["data"] == []
    assert "retired" in body["meta"]["notice"] and "2051-03-01" in body["meta"]["notice"]
    r = await client.get(f"{URL}?start_date=2051-03-10&end_date=2051-03-31", headers=acc.headers)
    assert len(r.json()["data"]) == 2 and "notice" not in r.json()["meta"]
    # the summary still counts the retired months from the rollups
    r = await client.get(f"{URL}/summary?start_date=2051-01-01&end_date=2051-03-31", headers=acc.headers)
    assert r.json()["data"]["total_invocations"] == 9 and r.json()["data"]["total_tokens"] == 210
    # the export says so in a header
    r = await client.get(f"{URL}/export?start_date=2051-01-01&end_date=2051-01-31", headers=acc.headers)
    assert r.status_code == 200 and "retired" in r.headers["Joyhub-Notice"]
    assert r.text.strip().count("\n") == 0  # the header line only


async def test_a_month_with_a_pending_call_waits(engine: AsyncEngine) -> None:
    acc, tool = await _seed(engine)
    await record_pending(engine, acc.user_id, tool, ts=utc(2051, 1, 30))
    assert await _retire(engine, utc(2052, 4, 4, 12), usage_retention_days=400) == 0
    assert "usage_logs_p205101" in await _names(engine)


async def test_archive_round_trip(engine: AsyncEngine, tmp_path: Path) -> None:
    acc, tool = await _seed(engine)
    await record_invocation(engine, acc.user_id, tool, tokens=5, ts=utc(2051, 2, 9), request_id="=cmd|x,y")
    async with engine.connect() as conn:
        result = await archive_month(conn, parse_month("2051-02"), tmp_path, progress=False)
    assert result.path == tmp_path / archive_name(parse_month("2051-02"))
    with gzip.open(result.path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == ARCHIVE_COLUMNS
    data = [dict(zip(ARCHIVE_COLUMNS, r, strict=True)) for r in rows[1:]]
    assert len(data) == result.rows == 4
    assert sum(int(d["tokens_used"]) for d in data) == result.tokens == 65
    assert {d["request_id"] for d in data} >= {"=cmd|x,y"}  # raw values, quoted as CSV
    assert not list(tmp_path.glob("*.partial"))


async def test_retention_archives_first_when_told(engine: AsyncEngine, tmp_path: Path) -> None:
    await _seed(engine)
    await _retire(engine, utc(2052, 4, 4, 12), usage_retention_days=400, usage_archive_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir() if "2051" in p.name)
    assert files == ["usage_logs-2051-01.csv.gz", "usage_logs-2051-02.csv.gz"]
    async with engine.connect() as conn:
        sql = "SELECT archive_path FROM usage_retirements WHERE month >= '2051-01-01' ORDER BY month"
        paths = (await conn.execute(text(sql))).scalars()
        assert [Path(p).name for p in paths] == files


def test_month_argument() -> None:
    assert parse_month("2051-02").isoformat() == "2051-02-01"
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_month("2051-2-30")

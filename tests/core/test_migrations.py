"""Migrations: upgrade → downgrade → upgrade on a real database, and no drift from the models."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from joyhub.core.migrations import migrate_async
from joyhub.models import Base
from joyhub.usage.partitions import is_partition
from tests.db_server import server_url, with_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def scratch_url() -> AsyncIterator[str]:
    admin_url = server_url()
    name = f"joyhub_mig_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield with_database(admin_url, name)
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await admin.dispose()


async def _tables(url: str) -> set[str]:
    eng = create_async_engine(url)
    async with eng.connect() as conn:
        rows = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        names = {r[0] for r in rows}
    await eng.dispose()
    return names


def _not_a_partition(name: str | None, type_: str, parent_names: object) -> bool:
    return not (type_ == "table" and name is not None and is_partition(name))


def _diff(connection: Connection) -> list[object]:
    ctx = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_name": _not_a_partition}
    )
    return list(compare_metadata(ctx, Base.metadata))


async def test_round_trip_and_no_drift(scratch_url: str) -> None:
    await migrate_async(scratch_url)
    model_tables = set(Base.metadata.tables)
    assert model_tables <= await _tables(scratch_url)

    await migrate_async(scratch_url, "base")
    assert await _tables(scratch_url) <= {"alembic_version"}

    await migrate_async(scratch_url)
    eng = create_async_engine(scratch_url)
    async with eng.connect() as conn:
        diff = await conn.run_sync(_diff)
        plans = (await conn.execute(text("SELECT code FROM plans ORDER BY rank"))).scalars().all()
    await eng.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert plans == ["free", "pro", "enterprise"]


async def test_migrate_to_a_revision_goes_down_and_up(scratch_url: str) -> None:
    await migrate_async(scratch_url)
    await migrate_async(scratch_url, "0001")
    eng = create_async_engine(scratch_url)
    async with eng.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM plans"))).scalar() == 0
    await migrate_async(scratch_url, "head")
    async with eng.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM plans"))).scalar() == 3
    await eng.dispose()


async def test_the_plans_get_the_contracts_rate_limits(scratch_url: str) -> None:
    """API.md §4.1's defaults: free 20 / 2, pro 300 / 10, enterprise no limit."""
    await migrate_async(scratch_url)
    eng = create_async_engine(scratch_url)
    async with eng.connect() as conn:
        rows = await conn.execute(
            text("SELECT code, requests_per_minute, max_concurrent FROM plans ORDER BY rank")
        )
        limits = [tuple(r) for r in rows]
    await eng.dispose()
    assert limits == [("free", 20, 2), ("pro", 300, 10), ("enterprise", None, None)]


async def test_0015_adds_and_drops_the_org_rollups_token_and_refusal_columns(scratch_url: str) -> None:
    added = {"input_tokens", "output_tokens", "rate_limited"}

    async def columns() -> set[str]:
        eng = create_async_engine(scratch_url)
        async with eng.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_org_daily'"
                )
            )
            names = {r[0] for r in rows}
        await eng.dispose()
        return names

    await migrate_async(scratch_url, "0014")
    assert not added & await columns()
    await migrate_async(scratch_url, "0015")
    assert added <= await columns()
    await migrate_async(scratch_url, "0014")
    assert not added & await columns()

"""The SQL rendering of timestamps in quota events equals the API's own (on the real server)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import iso_utc
from joyhub.webhooks.quota_alerts import iso_utc_sql

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "value",
    [
        datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2030, 1, 2, 3, 4, 5, 120, tzinfo=UTC),
        datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
async def test_sql_and_python_write_the_same_timestamp(engine: AsyncEngine, value: datetime) -> None:
    async with engine.connect() as conn:
        rendered = (
            await conn.execute(text(f"SELECT {iso_utc_sql('CAST(:v AS timestamptz)')}"), {"v": value})
        ).scalar()
    assert rendered == iso_utc(value)

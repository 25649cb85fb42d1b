"""The lifecycle of growing tables (issue 18): audit retention (off by default), bounded
identity cleanup, and every sweep job's rows counted in /metrics."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.core.db import make_sessionmaker
from joyhub.models import AuditLog
from joyhub.ops.sweeper import jobs, sweep_once
from tests.conftest import test_settings as hub_settings

pytestmark = pytest.mark.integration


async def _audit(engine: AsyncEngine, ages_days: list[int]) -> None:
    now = utcnow()
    async with make_sessionmaker(engine)() as db, db.begin():
        for age in ages_days:
            db.add(AuditLog(action="tool.create", target_type="tool", created_at=now - timedelta(days=age)))


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM audit_logs"))).scalar_one())


def _cleaned(job: str) -> float:
    return REGISTRY.get_sample_value("joyhub_cleanup_rows_total", {"job": job}) or 0.0


async def test_audit_logs_are_kept_forever_by_default(engine: AsyncEngine) -> None:
    await _audit(engine, [5000, 1])
    results = await sweep_once(make_sessionmaker(engine), hub_settings())
    assert results["audit_retention"] == 0
    assert await _count(engine) == 2


async def test_audit_retention_deletes_what_is_older_and_counts_it(engine: AsyncEngine) -> None:
    await _audit(engine, [400, 91, 89, 1])
    before = _cleaned("audit_retention")
    results = await sweep_once(make_sessionmaker(engine), hub_settings(audit_retention_days=90))
    assert results["audit_retention"] == 2
    assert await _count(engine) == 2
    assert _cleaned("audit_retention") == before + 2


def test_every_growing_table_has_a_cleanup_job() -> None:
    names = {name for name, _job in jobs()}
    assert {
        "identity_cleanup",  # sessions, refresh tokens, password-reset tokens, throttle hits
        "expired_idempotency_keys",
        "webhook_events_retention",  # and their deliveries (cascade)
        "notification_emails_retention",
        "audit_retention",
        "usage_partitions",
        "usage_retention",
    } <= names

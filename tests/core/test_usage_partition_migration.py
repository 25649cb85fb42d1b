"""Migration 0013 on a populated table: usage_logs converted to monthly partitions and back,
every row and every token kept, idempotency keys' links kept (issue 18)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from joyhub.core.migrations import migrate_async
from tests.db_server import server_url, with_database

pytestmark = pytest.mark.integration

ROWS = 3000


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


_SEED = [
    """INSERT INTO users (id, email, password_hash, name, role, is_active, created_at, updated_at)
       VALUES ('00000000-0000-0000-0000-0000000000aa', 'm@example.com', 'x', 'M', 'user', true,
               now(), now())""",
    """INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts, is_active,
                          created_at, updated_at)
       VALUES ('00000000-0000-0000-0000-0000000000bb', 'mig-tool', 'd', 'http://127.0.0.1:9/', 5, 1, true,
               now(), now())""",
    f"""INSERT INTO usage_logs (id, user_id, tool_id, plan_code, status, started_at, "timestamp",
                                tokens_used, tokens_reserved, token_source, duration_ms, request_id)
        SELECT gen_random_uuid(), '00000000-0000-0000-0000-0000000000aa',
               '00000000-0000-0000-0000-0000000000bb', 'pro', 'success',
               timestamptz '2024-01-01' + g * interval '3 hours',
               timestamptz '2024-01-01' + g * interval '3 hours' + interval '1 second',
               g % 97, 0, 'reported', 10, 'r' || g
        FROM generate_series(1, {ROWS}) AS g""",  # noqa: S608 (a constant of ours)
]


async def _fingerprint(url: str) -> tuple[int, int, str, int]:
    eng = create_async_engine(url)
    async with eng.connect() as conn:
        n, tokens = (await conn.execute(text("SELECT count(*), sum(tokens_used) FROM usage_logs"))).one()
        digest = (
            await conn.execute(
                text("SELECT md5(string_agg(id::text || request_id, ',' ORDER BY id)) FROM usage_logs")
            )
        ).scalar_one()
        linked = (
            await conn.execute(text("SELECT count(*) FROM idempotency_keys WHERE usage_log_id IS NOT NULL"))
        ).scalar_one()
    await eng.dispose()
    return int(n), int(tokens), str(digest), int(linked)


async def _partitioned(url: str) -> tuple[bool, int]:
    eng = create_async_engine(url)
    async with eng.connect() as conn:
        sql = "SELECT relkind::text FROM pg_class WHERE relname = 'usage_logs'"
        kind = (await conn.execute(text(sql))).scalar_one()
        parts = (
            await conn.execute(
                text("SELECT count(*) FROM pg_inherits WHERE inhparent = 'usage_logs'::regclass")
            )
        ).scalar_one()
    await eng.dispose()
    return kind == "p", int(parts)


async def test_a_populated_table_goes_up_and_down_intact(scratch_url: str) -> None:
    await migrate_async(scratch_url, "0011")
    eng = create_async_engine(scratch_url)
    async with eng.begin() as conn:
        for sql in _SEED:
            await conn.execute(text(sql))
        await conn.execute(
            text(
                "INSERT INTO idempotency_keys (id, user_id, key, request_hash, tool_id, usage_log_id, state,"
                " created_at, expires_at) SELECT gen_random_uuid(), user_id, 'k', '\\x00', tool_id, id,"
                " 'done', now(), now() + interval '1 day' FROM usage_logs ORDER BY started_at LIMIT 1"
            )
        )
    await eng.dispose()
    before = await _fingerprint(scratch_url)
    assert before[0] == ROWS and before[3] == 1

    await migrate_async(scratch_url, "0013")
    partitioned, parts = await _partitioned(scratch_url)
    # 3000 rows every 3 hours from 2024-01: Jan…Jun 2024, then to two months ahead, and a default
    assert partitioned and parts > 6
    assert await _fingerprint(scratch_url) == before

    await migrate_async(scratch_url, "0011")
    assert await _partitioned(scratch_url) == (False, 0)
    assert await _fingerprint(scratch_url) == before

    await migrate_async(scratch_url, "head")
    assert await _fingerprint(scratch_url) == before

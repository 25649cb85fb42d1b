"""Running Alembic from code: `joyhub migrate`, `joyhub serve` (migrates first) and the tests.

Migrations are found next to the package in a source checkout (`migrations/`); a PostgreSQL
advisory lock serialises concurrent `serve` processes migrating the same database.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

# the source checkout (or JOYHUB_ROOT in the container image), where alembic.ini and migrations/ live
ROOT = Path(os.environ.get("JOYHUB_ROOT") or Path(__file__).resolve().parents[3])
_LOCK_ID = 4_242_001


def alembic_config(url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    return cfg


def _run(connection: Connection, url: str, revision: str, downgrade: bool) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
    try:
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})


async def migrate_async(url: str, revision: str = "head") -> None:
    """Upgrade (or downgrade, when REV is older than the database) to `revision`."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(_current_revision)
            down = revision != "head" and await conn.run_sync(_is_older, url, revision, current)
            await conn.run_sync(_run, url, revision, down)
            await conn.commit()
    finally:
        await engine.dispose()


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _is_older(connection: Connection, url: str, revision: str, current: str | None) -> bool:
    """True when `revision` is an ancestor of the current one (so moving there is a downgrade)."""
    from alembic.script import ScriptDirectory

    if current is None:
        return False
    if revision == "base":
        return True
    script = ScriptDirectory.from_config(alembic_config(url))
    target = script.get_revision(revision)
    if target is None:
        return False
    return any(r.revision == target.revision for r in script.iterate_revisions(current, "base"))


def migrate(url: str, revision: str = "head") -> None:
    asyncio.run(migrate_async(url, revision))

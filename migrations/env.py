"""Alembic environment, async: runs migrations over an AsyncEngine's connection.

The URL comes from `config.attributes["url"]` (set by `joyhub.core.migrations`), else from the
settings (DATABASE_URL, or the embedded server).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from joyhub.models import Base
from joyhub.usage.partitions import is_partition

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return str(url)
    from joyhub.core.config import get_settings
    from joyhub.core.embedded_pg import start_embedded

    settings = get_settings()
    return settings.database_url or start_embedded(settings.data_dir)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate compares the models with the database, minus the monthly partitions of
    `usage_logs` (made by the sweep, not by the models: `joyhub.usage.partitions`)."""
    return not (type_ == "table" and name is not None and is_partition(name))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        include_name=include_name,
        transaction_per_migration=True,
    )


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run_sync)
    await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    existing = config.attributes.get("connection")
    if existing is not None:
        _run_sync(existing)
    else:
        asyncio.run(_run_async())

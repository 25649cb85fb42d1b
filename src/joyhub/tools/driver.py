"""SQL on the bare asyncpg connection under a pooled SQLAlchemy connection (the hot path).

An invocation runs about ten statements; through the ORM session each costs more Python than the
database spends on it. `DriverSession` executes SQLAlchemy `text()` statements — written with
`:named` parameters like everywhere else — directly on asyncpg: each statement is compiled once to
asyncpg's `$n` form (cached), then sent with its parameters in order. It also offers the one
AsyncSession method `rollups.bump` uses, `execute(text, params)`, so the settle transaction can
bump the rollups on the same connection without an ORM session around it.

Transactions are the caller's: `async with driver.transaction():` (or a transaction SQLAlchemy
already started on that connection).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import TextClause

# a row as asyncpg returns it (`asyncpg.Record`), read by column name
Record = Mapping[str, Any]

_DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


@lru_cache(maxsize=256)
def compiled(statement: TextClause) -> tuple[str, tuple[str, ...]]:
    """The statement as asyncpg SQL (`$1`, `$2`, ...) and the parameter names in that order."""
    result = statement.compile(dialect=_DIALECT)
    return result.string, tuple(result.positiontup or ())


async def driver_of(conn: AsyncConnection) -> Any:
    """The asyncpg connection under a checked-out SQLAlchemy connection.

    Read straight from the connection SQLAlchemy holds when it holds one (the usual case: no
    trip through a greenlet, about 10 µs less per statement on the hot path); an invalidated
    connection is revalidated the async way."""
    sync = conn.sync_connection
    if sync is not None and not sync.invalidated and not sync.closed:
        raw = sync.connection
    else:
        raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    return driver


class DriverSession:
    """`execute`/`fetchrow` of `text()` statements with named parameters, straight on asyncpg."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def execute(self, statement: TextClause, params: dict[str, Any] | None = None) -> None:
        sql, names = compiled(statement)
        values = params or {}
        await self.driver.execute(sql, *(values[n] for n in names))

    async def fetchrow(self, statement: TextClause, params: dict[str, Any] | None = None) -> Record | None:
        sql, names = compiled(statement)
        values = params or {}
        row: Record | None = await self.driver.fetchrow(sql, *(values[n] for n in names))
        return row

    async def fetch(self, statement: TextClause, params: dict[str, Any] | None = None) -> list[Record]:
        sql, names = compiled(statement)
        values = params or {}
        return list(await self.driver.fetch(sql, *(values[n] for n in names)))

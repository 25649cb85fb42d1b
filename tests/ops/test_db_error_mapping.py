"""Which database failures mean "unavailable" (503 SERVICE_UNAVAILABLE) and which are bugs (500).

What a PostgreSQL restart throws at the hub, as seen in `bench/load/pg_restart.py`: errors wrapped
by SQLAlchemy around its asyncpg adapter (whose class is a plain `Error`, the SQLSTATE says what
happened), and asyncpg's own exceptions from the statements that run on the raw driver.
"""

from __future__ import annotations

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.exc import DBAPIError, IntegrityError, InternalError

from joyhub.core.errors import is_db_unavailable

pytestmark = pytest.mark.unit


def _wrapped(driver_exc: Exception, cls: type[DBAPIError] = DBAPIError) -> DBAPIError:
    """What SQLAlchemy raises: its error around the adapter's error around asyncpg's."""
    adapted = AsyncAdapt_asyncpg_dbapi.Error(str(driver_exc), driver_exc)  # type: ignore[no-untyped-call]
    adapted.__cause__ = driver_exc
    err = cls("SELECT 1", {}, adapted)
    err.__cause__ = adapted
    return err


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")),
        _wrapped(asyncpg.exceptions.AdminShutdownError("terminating connection"), InternalError),
        _wrapped(asyncpg.exceptions.CannotConnectNowError("the database system is starting up")),
        _wrapped(asyncpg.exceptions.ConnectionFailureError("connection failure")),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg_base.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(e)[:30],
)
def test_unavailable(exc: BaseException) -> None:
    assert is_db_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        _wrapped(asyncpg.exceptions.UniqueViolationError("duplicate key"), IntegrityError),
        _wrapped(asyncpg.exceptions.UndefinedColumnError("column x does not exist")),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        ValueError("a bug of ours"),
        KeyError("x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_not_unavailable(exc: BaseException) -> None:
    assert not is_db_unavailable(exc)

"""The gateway's sweep jobs (run by `joyhub.ops.sweeper`): abandoned calls, expired keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.tools.idempotency import sweep_expired
from joyhub.tools.ledger import close_stale

Job = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]


def jobs() -> list[tuple[str, Job]]:
    return [
        ("stale_invocations", close_stale),
        ("expired_idempotency_keys", sweep_expired),
    ]

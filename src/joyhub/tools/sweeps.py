"""The gateway's sweep jobs (run by `joyhub.ops.sweeper`): abandoned calls, expired keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.tools.metering import MeteringStore

Job = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]


def jobs() -> list[tuple[str, Job]]:
    return [
        ("stale_invocations", MeteringStore.close_stale),
        ("expired_idempotency_keys", MeteringStore.forget_expired_keys),
    ]

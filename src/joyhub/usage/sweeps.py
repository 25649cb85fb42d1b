"""The usage domain's sweep jobs (run by `joyhub.ops.sweeper`): the raw logs' lifecycle.

- `usage_partitions`: the current month's partition of `usage_logs` and the next
  AHEAD_MONTHS' exist (`partitions.py`);
- `usage_retention`: whole months older than USAGE_RETENTION_DAYS are retired — archived first
  when USAGE_ARCHIVE_DIR is set — by dropping their partition (`retention.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from joyhub.core.config import Settings
from joyhub.usage import partitions, retention

Job = Callable[[AsyncSession, Settings, datetime], Awaitable[int]]


async def ensure_partitions(session: AsyncSession, settings: Settings, now: datetime) -> int:
    return await partitions.ensure_partitions(session, now)


def jobs() -> list[tuple[str, Job]]:
    return [
        ("usage_partitions", ensure_partitions),
        ("usage_retention", retention.retire_expired),
    ]

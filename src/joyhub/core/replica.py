"""Read replica routing (issue 18): analytics reads on a streaming replica, within a bound.

With DATABASE_REPLICA_URL set, usage history, summaries, timeseries, export and admin stats
read from the replica when both rules below allow it, and from the primary otherwise:

1. **Lag rule.** The replica is asked, per request, how far behind it is: 0 when it has replayed
   everything it received and its WAL receiver is streaming, else `now() - the commit time of
   the last transaction it replayed`. Past REPLICA_MAX_LAG_SECONDS — or unreachable, or not a
   replica at all — the read goes to the primary. An unreachable replica is not asked again for
   DOWN_SECONDS, so an outage costs one connect timeout per worker, not one per request.
2. **Read-your-writes rule.** A user's reads go to the primary for REPLICA_MAX_LAG_SECONDS (+1 s
   for the commit) after their latest usage write: their latest log's `timestamp` (admission or
   settle time), read on the primary through the `(user_id, timestamp)` index — one cheap probe
   per monthly partition. Why that is enough: replay is in commit order, so a replica whose lag
   is at most L has replayed every transaction committed more than L ago, and the user's last
   call committed within a second of its `timestamp`. So a user who has just invoked a tool
   sees that call in their history, while everybody else's analytics leave the primary.

We chose this time rule over comparing LSNs because it needs no state shared between workers
(the write's LSN would have to be remembered per user somewhere every worker can read); its
cost is one indexed probe on the primary, against the analytics query it takes off it.

Platform stats (admin) use the lag rule only: they are platform-wide rollups, where a few
seconds' staleness is the documented bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from joyhub.core.config import Settings
from joyhub.core.db import make_engine, make_sessionmaker

log = logging.getLogger("joyhub.replica")

DOWN_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 1.0
COMMIT_MARGIN = timedelta(seconds=1)

_LAG = text(
    """
    SELECT pg_is_in_recovery() AS replica,
           CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
                     AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')
                THEN 0
                ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 1e9)
           END AS lag
    """
)
_LAST_WRITE = text('SELECT max("timestamp") FROM usage_logs WHERE user_id = :user_id')


@dataclass
class ReadReplica:
    """The replica's engine and what this process knows of its health."""

    engine: AsyncEngine
    max_lag: float
    factory: async_sessionmaker[AsyncSession] = field(init=False)
    down_until: float = 0.0

    def __post_init__(self) -> None:
        self.factory = make_sessionmaker(self.engine)

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadReplica | None:
        if not settings.database_replica_url:
            return None
        engine = make_engine(settings.database_replica_url, settings, pool_timeout=PROBE_TIMEOUT_SECONDS)
        return cls(engine, settings.replica_max_lag_seconds)

    async def lag(self) -> float | None:
        """Seconds behind the primary; None when unusable (down, or not in recovery)."""
        if time.monotonic() < self.down_until:
            return None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS), self.engine.connect() as conn:
                row = (await conn.execute(_LAG)).one()
        except Exception as exc:  # any failure means: not now, read the primary
            self.down_until = time.monotonic() + DOWN_SECONDS
            log.warning("read replica unreachable; reading the primary", extra={"error": type(exc).__name__})
            return None
        return float(row.lag) if row.replica else None

    async def usable(self, primary: AsyncSession, user_id: uuid.UUID | None, now: datetime) -> str:
        """Where to read: "replica", or the reason to read the primary."""
        if user_id is not None:
            last = (await primary.execute(_LAST_WRITE, {"user_id": user_id})).scalar_one_or_none()
            if last is not None and last > now - timedelta(seconds=self.max_lag) - COMMIT_MARGIN:
                return "own_recent_write"
        lag = await self.lag()
        if lag is None:
            return "replica_down"
        if lag > self.max_lag:
            return "replica_lagging"
        return "replica"

"""Concurrency limits across workers and instances: at most N holders of a lease at once.

A lease is a slot of a bucket held while some long work runs (a CSV export). The holder
renews it while it works (`kept`), and gives it back when done; a holder that died without
giving it back (a killed worker) loses it when it has not been renewed for `ttl`. So the limit
holds across processes and machines without trusting any one of them to clean up.

Storage, as for the throttles (auth/throttle.py): PostgreSQL's `throttle_hits` rows when Redis
is not configured — a lease is a hit its holder keeps fresh, counted while fresher than `ttl`
(a short transaction with the bucket's advisory lock counts and inserts, so parallel takers
cannot both get the last slot) — or one Redis sorted set per bucket (score = last renewal,
one Lua script for the check-and-add). Either way the sweep's pruning of old hits, or Redis'
key expiry, removes what dead holders left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from redis.exceptions import RedisError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core.clock import utcnow
from joyhub.core.errors import ServiceUnavailable
from joyhub.models import ThrottleHit

log = logging.getLogger("joyhub.leases")

REDIS_KEY_PREFIX = "joyhub:lease:"


@dataclass(frozen=True)
class Lease:
    bucket: str
    id: str  # the hit's id (PostgreSQL) or the set member (Redis)
    ttl: timedelta


class Leases(Protocol):
    async def acquire(self, bucket: str, *, limit: int, ttl: timedelta, now: datetime) -> Lease | None:
        """A lease when fewer than `limit` live ones are held; None otherwise."""

    async def renew(self, lease: Lease, now: datetime) -> None:
        """Mark the lease as still held."""

    async def release(self, lease: Lease) -> None:
        """Give the slot back."""


class PostgresLeases:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def acquire(self, bucket: str, *, limit: int, ttl: timedelta, now: datetime) -> Lease | None:
        async with self._factory() as session, session.begin():
            await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(bucket, 0))))
            held = (
                await session.execute(
                    select(func.count())
                    .select_from(ThrottleHit)
                    .where(ThrottleHit.bucket == bucket, ThrottleHit.hit_at > now - ttl)
                )
            ).scalar_one()
            if held >= limit:
                return None
            hit_id = (
                await session.execute(
                    insert(ThrottleHit).values(bucket=bucket, hit_at=now).returning(ThrottleHit.id)
                )
            ).scalar_one()
        return Lease(bucket, str(hit_id), ttl)

    async def renew(self, lease: Lease, now: datetime) -> None:
        async with self._factory() as session, session.begin():
            await session.execute(
                update(ThrottleHit).where(ThrottleHit.id == int(lease.id)).values(hit_at=now)
            )

    async def release(self, lease: Lease) -> None:
        async with self._factory() as session, session.begin():
            await session.execute(delete(ThrottleHit).where(ThrottleHit.id == int(lease.id)))


# KEYS[1] bucket; ARGV: now, ttl seconds, limit, member. 1 when the member now holds a slot.
_ACQUIRE_LUA = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - ttl)
if redis.call('ZCARD', key) < tonumber(ARGV[3]) then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('EXPIRE', key, math.ceil(ttl) + 60)
  return 1
end
return 0
"""


class RedisLeases:
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._script = redis.register_script(_ACQUIRE_LUA)

    async def acquire(self, bucket: str, *, limit: int, ttl: timedelta, now: datetime) -> Lease | None:
        member = uuid.uuid4().hex
        seconds = ttl.total_seconds()
        try:
            got = await self._script(
                keys=[REDIS_KEY_PREFIX + bucket], args=[repr(now.timestamp()), repr(seconds), limit, member]
            )
        except RedisError as exc:
            raise _unavailable() from exc
        return Lease(bucket, member, ttl) if int(got) == 1 else None

    async def renew(self, lease: Lease, now: datetime) -> None:
        key = REDIS_KEY_PREFIX + lease.bucket
        try:
            await self._redis.zadd(key, {lease.id: now.timestamp()}, xx=True)
            await self._redis.expire(key, math.ceil(lease.ttl.total_seconds()) + 60)
        except RedisError as exc:
            raise _unavailable() from exc

    async def release(self, lease: Lease) -> None:
        try:
            await self._redis.zrem(REDIS_KEY_PREFIX + lease.bucket, lease.id)
        except RedisError as exc:
            raise _unavailable() from exc


def _unavailable() -> ServiceUnavailable:
    # fail closed, like the throttles: without its store the limit cannot be kept
    return ServiceUnavailable("The rate-limit store is unavailable", headers={"Retry-After": "2"})


def leases_for(state: Any) -> Leases:
    """The app's leases: Redis when `state.redis` is set, else PostgreSQL."""
    redis = getattr(state, "redis", None)
    if redis is not None:
        cached = getattr(state, "redis_leases", None)
        if cached is None:
            cached = state.redis_leases = RedisLeases(redis)
        return cached  # type: ignore[no-any-return]
    return PostgresLeases(state.sessionmaker)


@contextlib.asynccontextmanager
async def kept(leases: Leases, lease: Lease) -> AsyncIterator[None]:
    """Hold `lease` for the duration: renewed every third of its ttl by a task of its own (so a
    holder that is itself waiting — on a slow client — keeps it), released at the end."""

    async def renew_forever() -> None:
        while True:
            await asyncio.sleep(lease.ttl.total_seconds() / 3)
            try:
                await leases.renew(lease, utcnow())
            except Exception as exc:  # a missed renewal only shortens the lease
                log.warning("lease renewal failed", extra={"error": type(exc).__name__})

    renewer = asyncio.create_task(renew_forever())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        try:
            await leases.release(lease)
        except Exception as exc:  # the lease then runs out by itself within its ttl
            log.warning("lease release failed", extra={"error": type(exc).__name__})

"""Sliding-window throttles (failed logins, reset requests, password work per client address)
that hold across workers and restarts.

Storage is PostgreSQL's `throttle_hits` table, or Redis when `app.state.redis` is set. Either
way an attempt *reserves* its slot before the expensive work (bcrypt) in one atomic step:

- PostgreSQL: a short transaction of its own takes a per-bucket advisory lock, counts the
  bucket's hits inside the window and inserts one when under the limit. It commits at once, so
  a failed login is still counted when the request itself rolls back (it answers 401).
- Redis: one Lua script does the same on a sorted set (score = time of the hit).

Reserving first means a burst of parallel attempts cannot all slip under the limit while
their passwords are being checked. A successful login clears its bucket (`clear`), so only
failures stay counted. Times come from `joyhub.core.clock` (tests move the clock).

Bucket names are hashed: neither table nor Redis holds an email address or a client address.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from redis.exceptions import RedisError
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from joyhub.core.errors import ServiceUnavailable
from joyhub.models import ThrottleHit

REDIS_KEY_PREFIX = "joyhub:throttle:"
RESET_WINDOW = timedelta(hours=1)


def login_bucket(email: str, client_address: str) -> str:
    """Failed logins are counted per (email, client address): an attacker elsewhere cannot
    lock the victim out of the victim's own address."""
    digest = hashlib.sha256(f"{email}\x00{client_address}".encode()).hexdigest()
    return f"login:{digest}"


def reset_bucket(email: str) -> str:
    return f"reset:{hashlib.sha256(email.encode()).hexdigest()}"


def address_bucket(kind: str, client_address: str) -> str:
    """A per-client-address bucket: `password_work` (every request that costs a password hash,
    whatever the email), `register` (accounts created), `reset_request` (reset emails asked)."""
    return f"{kind}:{hashlib.sha256(client_address.encode()).hexdigest()}"


@dataclass(frozen=True)
class Decision:
    """The outcome of `acquire`: allowed (a hit was recorded), or refused with a wait time."""

    allowed: bool
    retry_after: int = 0


def _retry_after(hits: list[datetime], limit: int, window: timedelta, now: datetime) -> int:
    """Seconds until the bucket drops below `limit`: when its (n - limit)-th oldest hit leaves."""
    ordered = sorted(hits)
    pivot = ordered[max(len(ordered) - limit, 0)]
    seconds = (pivot + window - now).total_seconds()
    return max(1, math.ceil(seconds))


class Throttle(Protocol):
    async def acquire(self, bucket: str, *, limit: int, window: timedelta, now: datetime) -> Decision:
        """Record one hit when fewer than `limit` hits are in the window; else refuse."""

    async def clear(self, bucket: str) -> None:
        """Forget every hit of the bucket (a successful login)."""


class PostgresThrottle:
    """`throttle_hits` rows, written in short transactions of their own (committed at once)."""

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def acquire(self, bucket: str, *, limit: int, window: timedelta, now: datetime) -> Decision:
        async with self._factory() as session, session.begin():
            # serialise this bucket's check-and-insert (held only for this tiny transaction)
            await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(bucket, 0))))
            hits = list(
                (
                    await session.execute(
                        select(ThrottleHit.hit_at).where(
                            ThrottleHit.bucket == bucket, ThrottleHit.hit_at > now - window
                        )
                    )
                ).scalars()
            )
            if len(hits) >= limit:
                return Decision(False, _retry_after(hits, limit, window, now))
            await session.execute(insert(ThrottleHit).values(bucket=bucket, hit_at=now))
        return Decision(True)

    async def clear(self, bucket: str) -> None:
        async with self._factory() as session, session.begin():
            await session.execute(delete(ThrottleHit).where(ThrottleHit.bucket == bucket))


# KEYS[1] bucket; ARGV: now, window seconds, limit, member, ttl seconds.
# Returns {1} when a hit was recorded, else {0, score of the hit whose departure frees a slot}.
_ACQUIRE_LUA = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local n = redis.call('ZCARD', key)
if n < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('EXPIRE', key, tonumber(ARGV[5]))
  return {1}
end
local pivot = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
return {0, pivot[2]}
"""


class RedisThrottle:
    """One sorted set per bucket; the check-and-add is one atomic Lua script."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._script = redis.register_script(_ACQUIRE_LUA)

    async def acquire(self, bucket: str, *, limit: int, window: timedelta, now: datetime) -> Decision:
        seconds = window.total_seconds()
        try:
            result = await self._script(
                keys=[REDIS_KEY_PREFIX + bucket],
                args=[repr(now.timestamp()), repr(seconds), limit, uuid.uuid4().hex, math.ceil(seconds) + 60],
            )
        except RedisError as exc:
            raise _unavailable() from exc
        if int(result[0]) == 1:
            return Decision(True)
        pivot = float(result[1])
        return Decision(False, max(1, math.ceil(pivot + seconds - now.timestamp())))

    async def clear(self, bucket: str) -> None:
        try:
            await self._redis.delete(REDIS_KEY_PREFIX + bucket)
        except RedisError as exc:
            raise _unavailable() from exc


def _unavailable() -> ServiceUnavailable:
    # Fail closed: without its store the throttle cannot count, and an unthrottled login is
    # what an attacker would wait for. Answer 503 rather than letting attempts through.
    return ServiceUnavailable("The rate-limit store is unavailable", headers={"Retry-After": "2"})


ADDRESS_KINDS = ("password_work", "register", "reset_request")


class RefusalMemo:
    """A throttle that remembers, in this process, the per-client-address buckets it was refused
    for until they can be allowed again, and refuses those at once — no database or Redis trip.

    Only `address_bucket`s are remembered: they are never cleared, so once refused with a
    Retry-After of r seconds such a bucket cannot be allowed before now + r on any worker (the
    others can only add hits), and the memory is exact. It matters under a flood: one address
    sending hundreds of junk logins a second would otherwise cost a round trip each — on
    PostgreSQL, a pooled connection waiting on the bucket's advisory lock — and take the pool
    from everybody else. Failed-login buckets are cleared by a success, so they always ask.
    """

    def __init__(self, throttle: Throttle, refused_until: dict[str, datetime], size: int = 10_000) -> None:
        self._throttle = throttle
        self._until = refused_until
        self._size = size

    async def acquire(self, bucket: str, *, limit: int, window: timedelta, now: datetime) -> Decision:
        until = self._until.get(bucket)
        if until is not None:
            if until > now:
                return Decision(False, max(1, math.ceil((until - now).total_seconds())))
            del self._until[bucket]
        decision = await self._throttle.acquire(bucket, limit=limit, window=window, now=now)
        if not decision.allowed and bucket.startswith(ADDRESS_KINDS):
            self._until[bucket] = now + timedelta(seconds=decision.retry_after)
            while len(self._until) > self._size:
                del self._until[next(iter(self._until))]
        return decision

    async def clear(self, bucket: str) -> None:
        self._until.pop(bucket, None)
        await self._throttle.clear(bucket)


def throttle_for(state: Any) -> Throttle:
    """The app's throttle: Redis when `state.redis` is set, else PostgreSQL, behind the app's
    RefusalMemo (its memory kept on `state`: one per app, so per process)."""
    refused: dict[str, datetime] | None = getattr(state, "throttle_refusals", None)
    if refused is None:
        refused = state.throttle_refusals = {}
    return RefusalMemo(_store(state), refused)


def _store(state: Any) -> Throttle:
    redis = getattr(state, "redis", None)
    if redis is not None:
        cached = getattr(state, "auth_redis_throttle", None)
        if cached is None:
            cached = RedisThrottle(redis)
            state.auth_redis_throttle = cached
        return cached  # type: ignore[no-any-return]
    return PostgresThrottle(state.sessionmaker)


async def prune(session: AsyncSession, *, older_than: datetime) -> int:
    """Delete PostgreSQL hits older than every window (the sweep); Redis keys expire by TTL."""
    result = await session.execute(delete(ThrottleHit).where(ThrottleHit.hit_at <= older_than))
    return int(getattr(result, "rowcount", 0) or 0)

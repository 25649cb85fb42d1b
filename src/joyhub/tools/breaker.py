"""Per-tool circuit breakers (API.md §5): closed → open → half-open with exactly one trial call.

State per tool: `failures` (consecutive failed upstream attempts), `opened_until` (unset while
closed; open before it, half-open after it) and `trial_until` (the lease of the one trial call
let through in half-open). The rules, shared by both implementations:

- closed: every call passes; a failed attempt counts, and the threshold-th consecutive one opens
  the circuit for the recovery time; a success resets the count.
- open: calls fail fast with the time left as Retry-After; no upstream call.
- half-open: the first caller claims the trial (a lease, so a worker that dies mid-trial cannot
  wedge the circuit); everyone else fails fast while it runs. The trial's success closes the
  circuit, its failure reopens it. Late results of calls admitted before the circuit opened
  only add to the count; they neither close nor reopen it.

`InProcessBreakers` keeps this in a dict (one worker); `RedisBreakers` keeps it in one Redis
hash per tool and changes it only through small Lua scripts, so the trial claim is atomic across
workers and instances.

Transitions — closed to open, and open (or half-open) to closed by a trial's success — are told
to the listener set with `observe` (the webhook events `tool.circuit_opened`/`_closed`). The
scripts decide a transition atomically, so with Redis exactly one worker sees each one; an
in-process breaker is per worker, and so are its transitions.

Both take an injectable clock (epoch seconds) for tests. When Redis is unreachable the breaker
fails open (calls pass) and says so in the log: a Redis outage must not take every tool down
with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

log = logging.getLogger("joyhub.tools.breaker")

Clock = Callable[[], float]
CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class CircuitChange:
    """A transition of a tool's circuit: `opened` (from closed) or `closed` (a trial succeeded);
    `consecutive_failures` is the count at that moment (before the close resets it)."""

    tool_id: str
    change: Literal["opened", "closed"]
    consecutive_failures: int


CircuitListener = Callable[[CircuitChange], None]


def _ignore(change: CircuitChange) -> None:
    return None


TRIAL_RETRY_AFTER = 1.0
REDIS_KEY_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class Permit:
    """The breaker's answer to "may this call go upstream?"."""

    allowed: bool
    trial: bool = False
    retry_after: float = 0.0
    clean: bool = False  # closed with no failures counted: a success needs no write
    trial_due: bool = False  # half-open with the trial unclaimed, and the caller did not claim it


@dataclass(frozen=True)
class CircuitView:
    state: CircuitState
    consecutive_failures: int
    opened_until: datetime | None


def _view(failures: int, opened_until: float | None, now: float) -> CircuitView:
    if opened_until is None:
        return CircuitView("closed", failures, None)
    state: CircuitState = "open" if now < opened_until else "half_open"
    return CircuitView(state, failures, datetime.fromtimestamp(opened_until, UTC))


class Breakers(Protocol):
    threshold: int
    recovery_seconds: float
    clock: Clock

    async def acquire(self, tool_id: str, lease_seconds: float, *, claim_trial: bool = True) -> Permit:
        """May a call go upstream? In half-open, the first caller gets the trial — unless it
        passes `claim_trial=False` (it is not yet sure to make the call), which answers
        `Permit(False, trial_due=True)` and claims nothing."""
        ...

    async def record_failure(self, tool_id: str, *, trial: bool) -> bool: ...
    async def record_success(self, tool_id: str, *, trial: bool, clean: bool) -> None: ...
    async def release(self, tool_id: str, permit: Permit) -> None: ...
    async def view(self, tool_id: str) -> CircuitView: ...
    async def views(self, tool_ids: Iterable[str]) -> dict[str, CircuitView]: ...
    async def reset(self, tool_id: str) -> None: ...
    def observe(self, listener: CircuitListener) -> None:
        """Tell `listener` of every transition from now on (it must not block: it is called on
        the invocation's path)."""
        ...


@dataclass
class _State:
    failures: int = 0
    opened_until: float | None = None
    trial_until: float | None = None


class InProcessBreakers:
    """Breakers for one process. No locks needed: no method awaits between read and write."""

    def __init__(self, threshold: int, recovery_seconds: float, clock: Clock = time.time) -> None:
        self.threshold = threshold
        self.recovery_seconds = recovery_seconds
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._listener: CircuitListener = _ignore

    def observe(self, listener: CircuitListener) -> None:
        self._listener = listener

    async def acquire(self, tool_id: str, lease_seconds: float, *, claim_trial: bool = True) -> Permit:
        st = self._states.get(tool_id)
        if st is None or st.opened_until is None:
            return Permit(True, clean=st is None or st.failures == 0)
        now = self.clock()
        if now < st.opened_until:
            return Permit(False, retry_after=st.opened_until - now)
        if st.trial_until is not None and st.trial_until > now:
            return Permit(False, retry_after=TRIAL_RETRY_AFTER)
        if not claim_trial:
            return Permit(False, trial_due=True)
        st.trial_until = now + lease_seconds
        return Permit(True, trial=True)

    async def record_failure(self, tool_id: str, *, trial: bool) -> bool:
        """Count a failed attempt; return True when the circuit is no longer closed."""
        st = self._states.setdefault(tool_id, _State())
        st.failures += 1
        now = self.clock()
        was_closed = st.opened_until is None
        if (was_closed and st.failures >= self.threshold) or (not was_closed and trial):
            st.opened_until = now + self.recovery_seconds
            st.trial_until = None
            if was_closed:
                self._listener(CircuitChange(tool_id, "opened", st.failures))
        return st.opened_until is not None

    async def record_success(self, tool_id: str, *, trial: bool, clean: bool) -> None:
        st = self._states.get(tool_id)
        if st is None:
            return
        if trial or st.opened_until is None:
            del self._states[tool_id]
            if st.opened_until is not None:
                self._listener(CircuitChange(tool_id, "closed", st.failures))

    async def release(self, tool_id: str, permit: Permit) -> None:
        st = self._states.get(tool_id)
        if permit.trial and st is not None:
            st.trial_until = None

    async def view(self, tool_id: str) -> CircuitView:
        st = self._states.get(tool_id) or _State()
        return _view(st.failures, st.opened_until, self.clock())

    async def views(self, tool_ids: Iterable[str]) -> dict[str, CircuitView]:
        return {tid: await self.view(tid) for tid in tool_ids}

    async def reset(self, tool_id: str) -> None:
        self._states.pop(tool_id, None)


# KEYS[1] = the tool's hash; ARGV = now, lease, trial retry-after, claim the trial (1/0).
# Returns {allowed, trial, failures, retry_after, trial_due}.
_ACQUIRE = """
local v = redis.call('HMGET', KEYS[1], 'f', 'o', 't')
local f = tonumber(v[1]) or 0
local o = tonumber(v[2])
local t = tonumber(v[3])
local now = tonumber(ARGV[1])
if not o then return {1, 0, f, '0', 0} end
if now < o then return {0, 0, f, tostring(o - now), 0} end
if t and t > now then return {0, 0, f, ARGV[3], 0} end
if ARGV[4] ~= '1' then return {0, 0, f, '0', 1} end
redis.call('HSET', KEYS[1], 't', tostring(now + tonumber(ARGV[2])))
return {1, 1, f, '0', 0}
"""

# ARGV = now, threshold, recovery, trial (1/0), ttl. Returns {state, failures}: state 0 closed,
# 1 not closed, 2 opened by this very failure (from closed).
_FAILURE = """
local f = redis.call('HINCRBY', KEYS[1], 'f', 1)
local o = tonumber(redis.call('HGET', KEYS[1], 'o'))
local now = tonumber(ARGV[1])
local opened = 0
if (not o and f >= tonumber(ARGV[2])) or (o and ARGV[4] == '1') then
  if not o then opened = 1 end
  o = now + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'o', tostring(o))
  redis.call('HDEL', KEYS[1], 't')
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
if opened == 1 then return {2, f} end
if o then return {1, f} end
return {0, f}
"""

# ARGV = trial (1/0). A trial's success closes; a success while closed resets the count.
# Returns the failure count when this closed an open circuit, else -1.
_SUCCESS = """
if ARGV[1] == '1' or redis.call('HEXISTS', KEYS[1], 'o') == 0 then
  local v = redis.call('HMGET', KEYS[1], 'f', 'o')
  redis.call('DEL', KEYS[1])
  if v[2] then return tonumber(v[1]) or 0 end
end
return -1
"""


class RedisBreakers:
    """Breakers shared by every worker and instance through Redis (atomic Lua scripts)."""

    def __init__(
        self,
        redis: Any,
        threshold: int,
        recovery_seconds: float,
        clock: Clock = time.time,
        prefix: str = "joyhub:circuit:",
    ) -> None:
        self.redis = redis
        self.threshold = threshold
        self.recovery_seconds = recovery_seconds
        self.clock = clock
        self.prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._listener: CircuitListener = _ignore

    def observe(self, listener: CircuitListener) -> None:
        self._listener = listener

    def _key(self, tool_id: str) -> str:
        return self.prefix + tool_id

    @staticmethod
    def _unreachable(action: str, exc: BaseException) -> None:
        log.warning(
            "circuit state unavailable in Redis; failing open",
            extra={
                "action": action,
                "error": type(exc).__name__,
            },
        )

    async def acquire(self, tool_id: str, lease_seconds: float, *, claim_trial: bool = True) -> Permit:
        try:
            allowed, trial, failures, retry_after, due = await self._acquire(
                keys=[self._key(tool_id)],
                args=[
                    repr(self.clock()),
                    repr(lease_seconds),
                    repr(TRIAL_RETRY_AFTER),
                    "1" if claim_trial else "0",
                ],
            )
        except Exception as exc:  # redis errors and connection failures alike
            self._unreachable("acquire", exc)
            return Permit(True)
        return Permit(
            bool(int(allowed)),
            trial=bool(int(trial)),
            retry_after=float(retry_after),
            clean=int(failures) == 0 and not int(trial),
            trial_due=bool(int(due)),
        )

    async def record_failure(self, tool_id: str, *, trial: bool) -> bool:
        try:
            state, failures = await self._failure(
                keys=[self._key(tool_id)],
                args=[
                    repr(self.clock()),
                    self.threshold,
                    repr(self.recovery_seconds),
                    "1" if trial else "0",
                    REDIS_KEY_TTL,
                ],
            )
        except Exception as exc:
            self._unreachable("record_failure", exc)
            return False
        if int(state) == 2:
            self._listener(CircuitChange(tool_id, "opened", int(failures)))
        return bool(int(state))

    async def record_success(self, tool_id: str, *, trial: bool, clean: bool) -> None:
        if clean and not trial:
            return  # nothing counted, nothing to reset: spare the round trip on the hot path
        try:
            closed = int(await self._success(keys=[self._key(tool_id)], args=["1" if trial else "0"]))
        except Exception as exc:
            self._unreachable("record_success", exc)
            return
        if closed >= 0:
            self._listener(CircuitChange(tool_id, "closed", closed))

    async def release(self, tool_id: str, permit: Permit) -> None:
        if not permit.trial:
            return
        try:
            await self.redis.hdel(self._key(tool_id), "t")
        except Exception as exc:
            self._unreachable("release", exc)

    async def view(self, tool_id: str) -> CircuitView:
        return (await self.views([tool_id]))[tool_id]

    async def views(self, tool_ids: Iterable[str]) -> dict[str, CircuitView]:
        ids = list(tool_ids)
        if not ids:
            return {}
        now = self.clock()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for tid in ids:
                    pipe.hmget(self._key(tid), "f", "o")
                rows = await pipe.execute()
        except Exception as exc:
            self._unreachable("view", exc)
            return {tid: CircuitView("closed", 0, None) for tid in ids}
        out: dict[str, CircuitView] = {}
        for tid, (failures, opened) in zip(ids, rows, strict=True):
            out[tid] = _view(int(failures or 0), float(opened) if opened else None, now)
        return out

    async def reset(self, tool_id: str) -> None:
        try:
            await self.redis.delete(self._key(tool_id))
        except Exception as exc:
            from joyhub.core.errors import ServiceUnavailable

            raise ServiceUnavailable("Circuit state store (Redis) is unavailable") from exc

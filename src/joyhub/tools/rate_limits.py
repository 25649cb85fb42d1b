"""Rate and concurrency limits (API.md §4.1): what a refusal says, and the `X-RateLimit-*` headers.

The decisions themselves are the admission statement's (`metering.py`), made on rows it holds
locked, so they are exact across workers and instances. Each per-minute limit is a GCRA bucket
kept as one timestamp, `tat` (the theoretical arrival time of the next request): with a limit of
L a minute, the emission interval is T = 60/L s; a request at `now` passes when
max(tat, now) + T is at most 60 s ahead, and moves tat there. So a burst of L passes at once,
then one request every T, evenly — never twice the limit at a fixed window's edge.

From that state, this module says when a refused request would pass (`Retry-After`, whole
seconds, at least 1) and, for the per-minute limit with the fewest requests left, how many are
left and when the bucket is full again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from joyhub.core import metrics
from joyhub.core.errors import RateLimited

Scope = Literal["plan", "api_key", "tool", "concurrency"]
WINDOW = timedelta(seconds=60)
MAX_TOLERANCE = timedelta(milliseconds=100)


@dataclass(frozen=True)
class Bucket:
    """One per-minute limit as the admission statement saw it (on its locked row)."""

    scope: Scope
    limit: int  # requests per minute
    tat: datetime | None  # before this request
    ok: bool  # this request fits
    new_tat: datetime | None = None  # after this request, when it was admitted

    @property
    def interval(self) -> timedelta:
        return WINDOW / self.limit

    @property
    def tolerance(self) -> timedelta:
        """Half an interval, at most 0.1 s: the admission statement's slack for calls whose clocks
        reach the row out of order (`metering.py`)."""
        return min(self.interval / 2, MAX_TOLERANCE)

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until a request would pass (at least 1)."""
        start = max(self.tat or now, now)
        wait = (start + self.interval - WINDOW - self.tolerance - now).total_seconds()
        return max(1, math.ceil(wait - 1e-6))

    def remaining(self, now: datetime) -> int:
        """Requests that would pass right now, after this one."""
        tat = self.new_tat if self.new_tat is not None else max(self.tat or now, now)
        if not self.ok:
            return 0
        ahead = max(tat, now) - now
        return max(0, math.floor((WINDOW + self.tolerance - ahead) / self.interval))

    def reset(self, now: datetime) -> int:
        """Whole seconds until the bucket is full again."""
        tat = self.new_tat if self.new_tat is not None else (self.tat or now)
        return max(0, math.ceil((tat - now).total_seconds() - 1e-6))


@dataclass(frozen=True)
class Concurrency:
    limit: int
    running: int  # calls of the subscription in flight, before this one
    ok: bool


@dataclass(frozen=True)
class Limits:
    """Every limit that applies to a call, in the contract's order: plan, key, tool; then calls
    running at once."""

    buckets: tuple[Bucket, ...] = ()
    concurrency: Concurrency | None = None

    def refusal(self, now: datetime, headers: dict[str, str]) -> RateLimited | None:
        """429 RATE_LIMITED naming the first limit the call is over, or None; Retry-After is the
        earliest moment every limit it is over would let it pass."""
        over = [b for b in self.buckets if not b.ok]
        waits = [b.retry_after(now) for b in over]
        concurrency_full = self.concurrency is not None and not self.concurrency.ok
        if concurrency_full:
            waits.append(1)  # nobody knows when a running call ends: a second away at the earliest
        if not waits:
            return None
        if over:
            return _limited(over[0].scope, over[0].limit, max(waits), headers)
        assert self.concurrency is not None
        return _limited("concurrency", self.concurrency.limit, max(waits), headers)

    def headers(self, now: datetime) -> dict[str, str]:
        """`X-RateLimit-*` for the per-minute limit with the fewest requests left; none without one."""
        if not self.buckets:
            return {}
        tightest = min(self.buckets, key=lambda b: (b.remaining(now), b.limit))
        return {
            "X-RateLimit-Limit": str(tightest.limit),
            "X-RateLimit-Remaining": str(tightest.remaining(now)),
            "X-RateLimit-Reset": str(tightest.reset(now)),
        }


NO_LIMITS = Limits()


def count_refusal(refusal: RateLimited) -> None:
    """`joyhub_rate_limited_total{scope}`: once per refusal answered (deciding is pure)."""
    metrics.RATE_LIMITED.labels(refusal.details[0]["scope"]).inc()


def _limited(scope: Scope, limit: int, retry_after: int, headers: dict[str, str]) -> RateLimited:
    unit = "calls running at once" if scope == "concurrency" else "requests per minute"
    return RateLimited(
        f"Rate limit reached ({limit} {unit}, {scope.replace('_', ' ')})",
        details=[
            {
                "field": None,
                "message": f"Over the {scope.replace('_', ' ')} limit; retry in {retry_after} s",
                "scope": scope,
                "limit": limit,
            }
        ],
        headers={**headers, "Retry-After": str(retry_after)},
    )

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

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until a request would pass (at least 1)."""
        start = max(self.tat or now, now)
        wait = (start + self.interval - WINDOW - now).total_seconds()
        return max(1, math.ceil(wait - 1e-6))

    def remaining(self, now: datetime) -> int:
        """Requests that would pass right now, after this one."""
        tat = self.new_tat if self.new_tat is not None else max(self.tat or now, now)
        if not self.ok:
            return 0
        ahead = max(tat, now) - now
        return max(0, math.floor((WINDOW - ahead) / self.interval + 1e-9))

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
        """429 RATE_LIMITED for the first limit the call is over, or None."""
        for bucket in self.buckets:
            if not bucket.ok:
                return _limited(bucket.scope, bucket.limit, bucket.retry_after(now), headers)
        if self.concurrency is not None and not self.concurrency.ok:
            # nobody knows when a running call ends: the earliest it could be is a second away
            return _limited("concurrency", self.concurrency.limit, 1, headers)
        return None

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


def _limited(scope: Scope, limit: int, retry_after: int, headers: dict[str, str]) -> RateLimited:
    metrics.RATE_LIMITED.labels(scope).inc()
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

"""The delivery rules of API.md §11 in one place: retries, timeout, disabling, retention."""

from __future__ import annotations

import random
from datetime import timedelta

# after the first attempt: "about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h" (about 28 h in all)
RETRY_DELAYS = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
MAX_ATTEMPTS = 1 + len(RETRY_DELAYS)
ATTEMPT_TIMEOUT_SECONDS = 10.0
# a claimed delivery is not claimed again before this: longer than an attempt can take, so only
# a worker that died mid-attempt lets it go (it is then retried, at least once as promised)
CLAIM_LEASE = timedelta(seconds=60)
DISABLE_AFTER = timedelta(days=5)  # an endpoint failing (no success) this long is disabled
RETENTION = timedelta(days=30)  # events, deliveries and notification emails are kept this long
MAX_ENDPOINTS = 10  # per user (and for the platform's admin endpoints)
ROTATION_OVERLAP = timedelta(hours=24)  # the previous secret still signs this long


JITTER = 0.1  # ±10 %, so deliveries that failed together do not all come back in one instant


def next_attempt_delay(attempts: int) -> timedelta | None:
    """When to try again after `attempts` failed attempts; None when the schedule is spent."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return RETRY_DELAYS[attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)

"""API keys this process has seen pass the credential rule lately, so the gateway knows which
callers it may do schema work for *before* its admission statement (API.md §5; issue 12).

Validating an input against a tool's schema costs CPU; doing it before the caller is known would
let anyone burn it with a forged key. An access token's verified signature says who issued it
(us), so its holder was authenticated. An API key's form says nothing: the first call with a key
this process has not seen admitted is validated only after its statement has found the key good
(one more statement, once per key per process and interval), and the key is then remembered
here. A revoked key stays "seen" for at most TTL_SECONDS, which only means that its (refused)
calls are validated before being refused with 401 — never that one is admitted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

TTL_SECONDS = 300.0
MAX_KEYS = 8192


class RecentKeys:
    """A bounded LRU of API key digests with a time to live (one per process)."""

    def __init__(
        self,
        ttl_seconds: float = TTL_SECONDS,
        size: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.size = size
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __contains__(self, digest: bytes) -> bool:
        seen = self._seen.get(digest)
        return seen is not None and self.clock() - seen < self.ttl

    def add(self, digest: bytes) -> None:
        self._seen[digest] = self.clock()
        self._seen.move_to_end(digest)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

"""Prometheus metrics (API.md §8). Labels are route templates, tools and outcomes — never user
ids or emails, so cardinality stays bounded.

With several workers (`joyhub serve --workers N`) the CLI sets PROMETHEUS_MULTIPROC_DIR and
`/metrics` aggregates every worker's samples (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry, Pool

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HTTP_REQUESTS = Counter("joyhub_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "joyhub_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
INVOCATIONS = Counter("joyhub_tool_invocations_total", "Tool invocations by outcome", ["tool", "outcome"])
UPSTREAM_LATENCY = Histogram(
    "joyhub_upstream_duration_seconds",
    "Latency of upstream tool calls (per attempt)",
    ["tool"],
    buckets=_LATENCY_BUCKETS,
)
CIRCUIT_STATE = Gauge(
    "joyhub_circuit_state",
    "Circuit state per tool (0 closed, 1 half-open, 2 open)",
    ["tool"],
    multiprocess_mode="max",
)
CLEANUP_ROWS = Counter(
    "joyhub_cleanup_rows_total",
    "Rows removed (or, for usage_retention, retired with their month) by each sweep job",
    ["job"],
)
USAGE_MONTHS_RETIRED = Counter(
    "joyhub_usage_months_retired_total", "Monthly partitions of usage_logs retired (dropped)"
)
ANALYTICS_READS = Counter(
    "joyhub_analytics_reads_total",
    "Analytics requests by where they read (replica or primary) and why (core/replica.py)",
    ["target", "reason"],
)
QUOTA_DENIALS = Counter("joyhub_quota_denials_total", "Invocations refused for quota", ["plan"])
GROUP_COMMIT_BATCH = Histogram(
    "joyhub_group_commit_batch_size",
    "Calls written by one group-committed statement (issue 15): admissions and settles of one account",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
RATE_LIMITED = Counter(
    "joyhub_rate_limited", "Invocations refused by a rate or concurrency limit (API.md §4.1)", ["scope"]
)
ADMISSION_RECOVERIES = Counter(
    "joyhub_gateway_admission_recoveries_total",
    "Admissions whose connection failed under the statement, undone and made again",
)
DB_POOL_IN_USE = Gauge(
    "joyhub_db_pool_connections_in_use",
    "Database connections checked out of the pool",
    multiprocess_mode="livesum",
)
DB_POOL_SIZE = Gauge(
    "joyhub_db_pool_size", "Configured pool size (+ overflow in use)", multiprocess_mode="livesum"
)

GATEWAY_WAITING = Gauge(
    "joyhub_gateway_admissions_waiting",
    "Invocations waiting for an admission slot (tools/admission.py)",
    multiprocess_mode="livesum",
)

WEBHOOK_ATTEMPTS = Counter(
    "joyhub_webhook_attempts_total",
    "Webhook delivery attempts by outcome (success, http_3xx, http_4xx, http_5xx, timeout, "
    "connection_error, secret_unreadable)",
    ["outcome"],
)
WEBHOOK_DELIVERIES = Counter(
    "joyhub_webhook_deliveries_total",
    "Webhook deliveries by final outcome (succeeded; failed when the retry schedule is spent)",
    ["outcome"],
)
WEBHOOK_QUEUE_DEPTH = Gauge(
    "joyhub_webhook_queue_depth",
    "Webhook deliveries pending (due now or waiting for a retry)",
    multiprocess_mode="livemax",
)
WEBHOOK_OLDEST_PENDING_SECONDS = Gauge(
    "joyhub_webhook_oldest_pending_seconds",
    "Age of the oldest pending webhook delivery",
    multiprocess_mode="livemax",
)
NOTIFICATION_EMAILS = Counter(
    "joyhub_notification_emails_total", "Notification emails by kind and outcome", ["kind", "outcome"]
)

CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class PoolUsage:
    """One pool's connections as its events tell them: the entries checked out, and the entries
    holding an open connection. Weak sets, so an entry the pool has dropped cannot linger."""

    __slots__ = ("__weakref__", "checked_out", "open", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.checked_out: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()
        self.open: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()

    def pool_size(self) -> int:
        """The configured size, or the connections open when overflow pushes it past that."""
        return max(self.size, len(self.open))


# Kept alive by the listeners on the pool's dispatch (which `engine.dispose()` hands on to the
# pool it recreates), so an engine that is garbage-collected stops being counted by itself.
_POOLS: weakref.WeakSet[PoolUsage] = weakref.WeakSet()


def track_pool(pool: Pool) -> PoolUsage:
    """Keep `DB_POOL_IN_USE` and `DB_POOL_SIZE` current from the pool's own events.

    Why events: with several workers the gauges are "livesum" files, one per process, and a
    value set only when a scrape happens to land in a process goes stale in all the others.
    Here every checkout and checkin rewrites this process's value (a dict or mmap write).

    What is counted: a set of pool entries, not a running +1/-1. The pool fires `checkin` also
    for entries whose checkout never completed (an invalidated entry whose reconnect failed, as
    when the database is down, or a failed ping followed by a failed reconnect): a running count
    would drift one lower each time; a set ignores a checkin of an entry it never held. Reading
    `pool.checkedout()` in the events would not do either: `checkin` fires *before* the entry is
    back in the queue (the value would stay one high), and an overflow connection is closed,
    with an await in between, before the overflow count drops. Register after
    `ping_on_checkout`, so a connection that fails its ping is not counted, its replacement is.

    Several engines in one process (the tests make many): the gauges report the sum over every
    live tracked pool, since a process has only one value per gauge. A pool counts its
    configured size for as long as its engine lives (a disposed engine is still usable: it
    opens connections again on demand); one that is garbage-collected drops out of the sums at
    the next event or `refresh_pool_gauges()`, not from the collector (prometheus-client's
    value lock is not reentrant). In production there is one engine per process.
    """
    configured = getattr(pool, "size", None)  # queue pools have a size; NullPool and the like not
    usage = PoolUsage(configured() if callable(configured) else 0)

    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        usage.checked_out.add(record)
        _refresh_in_use()

    def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        usage.checked_out.discard(record)
        _refresh_in_use()

    def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        usage.open.add(record)
        _refresh_size()

    def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        usage.open.discard(record)
        _refresh_size()

    def on_detach(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # the connection leaves the pool's care (closed later as "close_detached"), and its
        # entry goes back to the pool without a checkin event
        usage.checked_out.discard(record)
        usage.open.discard(record)
        _refresh_in_use()
        _refresh_size()

    event.listen(pool, "checkout", on_checkout)
    event.listen(pool, "checkin", on_checkin)
    event.listen(pool, "connect", on_connect)
    event.listen(pool, "close", on_close)
    event.listen(pool, "detach", on_detach)
    _POOLS.add(usage)
    _refresh_size()
    return usage


def refresh_pool_gauges() -> None:
    """Recompute both pool gauges from the live pools (the events do it for what they change)."""
    _refresh_in_use()
    _refresh_size()


def _refresh_in_use() -> None:
    DB_POOL_IN_USE.set(sum(len(u.checked_out) for u in _POOLS))


def _refresh_size() -> None:
    DB_POOL_SIZE.set(sum(u.pool_size() for u in _POOLS))


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

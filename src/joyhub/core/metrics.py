"""Prometheus metrics (API.md §8). Labels are route templates, tools and outcomes — never user
ids or emails, so cardinality stays bounded.

With several workers (`joyhub serve --workers N`) the CLI sets PROMETHEUS_MULTIPROC_DIR and
`/metrics` aggregates every worker's samples (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

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
QUOTA_DENIALS = Counter("joyhub_quota_denials_total", "Invocations refused for quota", ["plan"])
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

CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

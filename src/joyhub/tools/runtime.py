"""How a process builds its gateway (`gateway.Gateway`) at start-up, from the settings and the
resources the lifespan opened: the metering store on the engine, the upstream client (one pool),
the circuit breakers (Redis-backed when Redis is configured, in-process otherwise) and the
admission line. The lifespan (`ops/startup.py`) closes the client and drains the invocations in
flight on shutdown, so a deploy does not leave calls unaccounted.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from joyhub.core.config import Settings
from joyhub.core.egress import EgressPolicy
from joyhub.tools.admission import AdmissionGate
from joyhub.tools.breaker import Breakers, InProcessBreakers, RedisBreakers
from joyhub.tools.gateway import Gateway
from joyhub.tools.metering import MeteringStore
from joyhub.tools.upstream import Upstream


def _skip_missing_sniffio() -> None:
    """Make httpcore's `import sniffio` fail fast when sniffio is not installed.

    httpcore tries that import whenever it creates a lock — several times per upstream request —
    and anyio 4 no longer pulls sniffio in. A failed import is not cached: each one walks
    sys.path (about 0.1 ms apiece here). Recording the absence in `sys.modules` makes the import
    raise ImportError at once, which is exactly what httpcore handles ("asyncio").
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def make_breakers(settings: Settings, redis: Any) -> Breakers:
    if redis is not None:
        return RedisBreakers(redis, settings.circuit_failure_threshold, settings.circuit_recovery_seconds)
    return InProcessBreakers(settings.circuit_failure_threshold, settings.circuit_recovery_seconds)


def build_gateway(
    settings: Settings,
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    redis: Any,
    egress: EgressPolicy | None = None,
) -> Gateway:
    """The process's gateway; the caller closes `gateway.upstream` and drains it on shutdown.
    `egress` decides which addresses the upstream client may connect to (`core/egress.py`)."""
    _skip_missing_sniffio()
    return Gateway(
        store=MeteringStore(engine),
        upstream=Upstream.with_pool(settings.upstream_max_connections, egress),
        breakers=make_breakers(settings, redis),
        gate=AdmissionGate(settings.gateway_max_admissions, settings.gateway_queue_timeout_seconds),
        sessionmaker=sessionmaker,
        stream_max_seconds=settings.tool_stream_max_seconds,
        stream_ping_seconds=settings.stream_ping_seconds,
    )

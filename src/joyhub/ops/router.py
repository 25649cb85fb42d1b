"""Liveness and readiness (API.md §8). `/ready` never hangs longer than 2 s."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from joyhub import __version__
from joyhub.core import metrics
from joyhub.core.envelope import Envelope, error_response, ok
from joyhub.core.security import constant_time_equal

router = APIRouter(tags=["operations"])
READY_TIMEOUT_SECONDS = 1.0


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition (not enveloped); with METRICS_TOKEN set, only for its bearer.

    The figures name routes, tools and pool sizes — a map of the service and of its load that
    should not be public. Without a token, keep /metrics off the public network (README).
    Nothing is sampled here: the pool gauges are kept current by the pool's own events in every
    process (`metrics.track_pool`), so a scrape answered by one worker reports every worker's
    pool as it is, not as it was at that worker's last scrape. Mounted by the app factory
    directly on the app (not through this router), outside the OpenAPI schema.
    """
    token: str | None = request.app.state.settings.metrics_token
    if token is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not constant_time_equal(presented.strip(), token):
            return error_response(
                401,
                "NOT_AUTHENTICATED",
                "Metrics need the METRICS_TOKEN bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
    body, content_type = metrics.render()
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


@router.get("/health", response_model=Envelope[dict[str, str]], summary="Liveness (no dependencies)")
async def health() -> Envelope[dict[str, str]]:
    return ok({"status": "ok", "version": __version__})


async def _check_database(request: Request) -> None:
    async with request.app.state.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _check_redis(request: Request) -> None:
    await request.app.state.redis.ping()


@router.get(
    "/ready",
    response_model=Envelope[dict[str, Any]],
    summary="Readiness: database (and Redis when configured)",
    responses={503: {"model": Envelope[None], "description": "A dependency is down"}},
)
async def ready(request: Request) -> Any:
    checks: dict[str, str] = {}
    probes = {"database": _check_database}
    if getattr(request.app.state, "redis", None) is not None:
        probes["redis"] = _check_redis
    failing: list[str] = []
    for name, probe in probes.items():
        try:
            await asyncio.wait_for(probe(request), READY_TIMEOUT_SECONDS)
            checks[name] = "ok"
        except Exception:  # any failure, including the timeout, means not ready
            checks[name] = "unavailable"
            failing.append(name)
    if failing:
        return error_response(
            503,
            "SERVICE_UNAVAILABLE",
            f"Not ready: {', '.join(failing)} unavailable",
            [{"check": n, "status": "unavailable"} for n in failing],
        )
    return ok({"status": "ready", "checks": checks})

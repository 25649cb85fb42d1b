"""No endpoint or route dependency is a plain `def`: FastAPI runs those on a worker thread, one
thread hop per request (measured: ≈ 0.2 ms of CPU on every `GET /tools` from the paging
parameters alone)."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute

from joyhub.main import create_app
from tests.conftest import test_settings as make_settings

# a class dependency (FastAPI's form model): only on POST /auth/token, the OAuth2 form login
ALLOWED = {"OAuth2PasswordRequestForm"}


def _sync_dependencies(dependant: Any, found: set[str]) -> set[str]:
    for sub in dependant.dependencies:
        call = sub.call
        name = getattr(call, "__name__", type(call).__name__)
        is_async = (
            inspect.iscoroutinefunction(call)
            or inspect.isasyncgenfunction(call)
            or inspect.iscoroutinefunction(type(call).__call__)  # security schemes: async __call__
        )
        if not is_async and name not in ALLOWED:
            found.add(name)
        _sync_dependencies(sub, found)
    return found


def _api_routes(routes: list[Any]) -> list[APIRoute]:
    """Every APIRoute, including those of included routers (FastAPI keeps those in their own
    router, behind `original_router`)."""
    out: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif hasattr(route, "original_router"):
            out.extend(_api_routes(route.original_router.routes))
    return out


def test_every_dependency_runs_on_the_event_loop(tmp_path: Any) -> None:
    app = create_app(make_settings(tmp_path))
    routes = _api_routes(list(app.routes))
    assert len(routes) > 40  # the walk reaches the included routers' routes
    found: set[str] = set()
    for route in routes:
        _sync_dependencies(route.dependant, found)
        if not inspect.iscoroutinefunction(route.endpoint):
            found.add(route.endpoint.__name__)
    assert found == set()

"""The metered invocation routes are matched first; the OpenAPI document keeps the declared order.

FastAPI matches a request against the app's routes in order, and it tries an included router by
matching each of the router's routes — twice, once to find the router and once inside it. With
about eighty routes, a call to the OpenAI surface (declared last) paid about 0.13 ms of matching
before its handler ran, and `POST /tools/{id}/invoke` about 0.035 ms (`bench/route_bench.py`:
the app in-process, the gateway stubbed out). Those calls are the hub's hot path and their
prefixes belong to no other route, so the routers mounted there are moved to the front of the
route table. Every other request now tries their eight routes first: about 0.01 ms more.

What a reader sees does not change: the OpenAPI document (and with it the committed document
and the generated client) is built from the routes in the order the app declares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import BaseRoute


def match_first(app: FastAPI, prefixes: tuple[str, ...]) -> None:
    """Move the routers mounted at `prefixes` to the front of `app`'s route table.

    Call it once every route is in place. A prefix some other route's path also starts with
    would change which route answers that path, so it is refused here, when the app is built."""
    declared = list(app.router.routes)
    first = [route for route in declared if _prefix(route) in prefixes]
    rest = [route for route in declared if _prefix(route) not in prefixes]
    for route in rest:
        for path in _paths(route):
            if any(path == p or path.startswith(p + "/") for p in prefixes):
                raise ValueError(f"{path} would be shadowed by a router matched first")
    app.router.routes[:] = first + rest

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                summary=app.summary,
                description=app.description,
                terms_of_service=app.terms_of_service,
                contact=app.contact,
                license_info=app.license_info,
                routes=declared,
                webhooks=app.webhooks.routes,
                tags=app.openapi_tags,
                servers=app.servers,
                separate_input_output_schemas=app.separate_input_output_schemas,
                external_docs=app.openapi_external_docs,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _prefix(route: BaseRoute) -> str | None:
    """The prefix an included router is mounted at (None for a route of the app's own)."""
    context = getattr(route, "include_context", None)
    return getattr(context, "prefix", None) if context is not None else None


def _paths(route: BaseRoute) -> Iterator[str]:
    """Every path template `route` answers, in full (an included router's, under its prefix)."""
    router = getattr(route, "original_router", None)
    if router is None:
        yield str(getattr(route, "path", ""))
        return
    prefix = _prefix(route) or ""
    for child in router.routes:
        for path in _paths(child):
            yield prefix + path

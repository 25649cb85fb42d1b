"""The app factory: routers, middleware, error handlers and the lifespan (API.md §1).

`create_app(settings)` builds an app; the lifespan resolves the database (DATABASE_URL, or the
embedded server under DATA_DIR), opens the pool, Redis and the upstream HTTP client, ensures
the bootstrap admin, starts the periodic sweep, and closes everything in reverse on shutdown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from joyhub import __version__
from joyhub.core.config import Settings, get_settings
from joyhub.core.db import make_engine, make_sessionmaker
from joyhub.core.envelope import Envelope
from joyhub.core.errors import install_error_handlers
from joyhub.core.logging import install_record_factory
from joyhub.core.middleware import RequestPipelineMiddleware
from joyhub.core.openapi import operation_id
from joyhub.core.route_order import match_first
from joyhub.core.security import set_bcrypt_max_pending

log = logging.getLogger("joyhub")
API_PREFIX = "/api/v1"
OPENAI_PREFIX = f"{API_PREFIX}/openai"

# answers any API route can give, documented once for all of them (API.md §1)
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Envelope[None], "description": "MALFORMED_JSON: the body is not valid JSON"},
    413: {"model": Envelope[None], "description": "PAYLOAD_TOO_LARGE: the body is over 1 MiB"},
    422: {"model": Envelope[None], "description": "VALIDATION_ERROR, with one detail per field"},
    500: {"model": Envelope[None], "description": "INTERNAL_ERROR (logged with the request id)"},
    503: {
        "model": Envelope[None],
        "description": "SERVICE_UNAVAILABLE (Retry-After): the database is unreachable or its pool"
        " exhausted, or the password-hashing queue or the gateway's admission line is full",
    },
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from joyhub.ops import lifecycle

    async with lifecycle.running(app):
        yield


def create_app(settings: Settings | None = None, **state: Any) -> FastAPI:
    """Build the ASGI app. `state` pre-seeds `app.state` (tests pass an engine, for example)."""
    settings = settings or get_settings()
    install_record_factory()
    app = FastAPI(
        title="Joyfull UI Hub",
        version=__version__,
        description="Accounts, plans and metered access to many AI tools through one API.",
        lifespan=lifespan,
        swagger_ui_parameters={"persistAuthorization": True},
        generate_unique_id_function=operation_id,  # `tools-invoke`: the SDK's names (core/openapi.py)
    )
    app.state.settings = settings
    set_bcrypt_max_pending(settings.bcrypt_max_pending)  # the process's password-hash queue bound
    for key, value in state.items():
        setattr(app.state, key, value)

    from joyhub.admin.router import router as admin_router
    from joyhub.auth.router import router as auth_router
    from joyhub.openai_compat.catalog import ModelCatalog
    from joyhub.openai_compat.errors import openai_error_response
    from joyhub.openai_compat.router import router as openai_router
    from joyhub.ops.router import prometheus_metrics
    from joyhub.ops.router import router as ops_router
    from joyhub.orgs.admin_router import router as admin_orgs_router
    from joyhub.orgs.router import invitations_router
    from joyhub.orgs.router import router as orgs_router
    from joyhub.orgs.webhooks_router import RESPONSES as ORG_WEBHOOK_RESPONSES
    from joyhub.orgs.webhooks_router import router as org_webhooks_router
    from joyhub.subscriptions.router import router as subscriptions_router
    from joyhub.tools.router import router as tools_router
    from joyhub.usage.router import router as usage_router
    from joyhub.users.router import router as users_router
    from joyhub.webhooks.router import user_router as webhooks_router

    app.include_router(ops_router)
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    api = [
        (auth_router, "auth"),
        (users_router, "users"),
        (subscriptions_router, "subscriptions"),
        (tools_router, "tools"),
        (usage_router, "usage"),
        (admin_router, "admin"),
        (orgs_router, "orgs"),
    ]
    for router, name in api:
        app.include_router(router, prefix=f"{API_PREFIX}/{name}", tags=[name], responses=COMMON_RESPONSES)
    # teams (API.md §13): accepting an invitation, and the platform admin's views of organizations
    app.include_router(
        invitations_router, prefix=f"{API_PREFIX}/invitations", tags=["orgs"], responses=COMMON_RESPONSES
    )
    app.include_router(
        org_webhooks_router,
        prefix=f"{API_PREFIX}/orgs/{{org_id}}/webhooks",
        tags=["orgs"],
        responses={**COMMON_RESPONSES, **ORG_WEBHOOK_RESPONSES},
    )
    app.include_router(
        admin_orgs_router, prefix=f"{API_PREFIX}/admin/orgs", tags=["admin"], responses=COMMON_RESPONSES
    )
    # the caller's webhooks and notification settings live under /users/me (API.md §11)
    app.include_router(
        webhooks_router, prefix=f"{API_PREFIX}/users", tags=["webhooks"], responses=COMMON_RESPONSES
    )
    # the OpenAI-compatible surface (API.md §12): OpenAI's shapes, its own errors
    app.state.openai_models = ModelCatalog()
    app.include_router(openai_router, prefix=OPENAI_PREFIX, tags=["openai"])
    if os.environ.get("JOYHUB_DEMO") == "1":  # `joyhub serve --demo`: the built-in demo tools
        from joyhub.demo import router as demo_router

        app.include_router(demo_router, prefix="/demo", include_in_schema=False)
    # the metered calls' routers are matched before the rest; the document keeps this order
    match_first(app, (f"{API_PREFIX}/tools", OPENAI_PREFIX))

    install_error_handlers(app, dialects=[(OPENAI_PREFIX, openai_error_response)])
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origin_list,
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
        # what a dashboard on another origin may read from JavaScript (a browser hides every
        # other response header of a cross-origin call); tested in a real browser by
        # clients/typescript/test/browser.test.ts
        expose_headers=[
            "X-Request-ID",
            "X-Quota-Limit",
            "X-Quota-Remaining",
            "X-Quota-Reset",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "Retry-After",
            "Idempotent-Replayed",
        ],
    )
    app.add_middleware(RequestPipelineMiddleware, hsts=settings.environment == "production")
    return app


def __getattr__(name: str) -> Any:
    # `joyhub.main:app` for `uvicorn joyhub.main:app`; built lazily so importing is cheap.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["create_app", "make_engine", "make_sessionmaker"]

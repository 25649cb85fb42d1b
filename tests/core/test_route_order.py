"""The invocation routers are matched first, the document keeps the declared order, and a router
matched first may not take another route's path (`core/route_order.py`)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from joyhub.core.openapi import render
from joyhub.core.route_order import match_first
from joyhub.main import API_PREFIX, OPENAI_PREFIX, create_app
from tests.conftest import test_settings as hub_settings

COMMITTED = Path(__file__).resolve().parents[2] / "clients" / "typescript" / "openapi.json"


def _prefixes(app: FastAPI) -> list[str | None]:
    return [getattr(getattr(r, "include_context", None), "prefix", None) for r in app.router.routes]


def test_the_invocation_routers_come_first_and_the_document_keeps_the_declared_order(tmp_path: Path) -> None:
    app = create_app(hub_settings(tmp_path))
    assert _prefixes(app)[:2] == [f"{API_PREFIX}/tools", OPENAI_PREFIX]
    paths = list(app.openapi()["paths"])
    assert paths[0] == "/health"  # the operations router, declared first
    assert paths[-1].startswith(OPENAI_PREFIX)  # declared last
    assert render(app.openapi()) == COMMITTED.read_text()


def _app(*mounts: tuple[str, list[str]]) -> FastAPI:
    app = FastAPI()
    for prefix, paths in mounts:
        router = APIRouter()
        for path in paths:

            async def endpoint(prefix: str = prefix, path: str = path) -> dict[str, str]:
                return {"route": prefix + path}

            router.add_api_route(path, endpoint, methods=["GET"])
        app.include_router(router, prefix=prefix)
    return app


async def test_every_path_is_answered_by_the_same_route_after_the_move() -> None:
    app = _app(("/a", ["/x", "/{item}"]), ("/hot", ["/{item}/run", "/list"]), ("/b", ["/y"]))
    match_first(app, ("/hot",))
    assert _prefixes(app)[0] == "/hot"
    assert [p for p in _prefixes(app) if p] == ["/hot", "/a", "/b"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for path, route in [
            ("/a/x", "/a/x"),
            ("/a/7", "/a/{item}"),
            ("/hot/7/run", "/hot/{item}/run"),
            ("/hot/list", "/hot/list"),
            ("/b/y", "/b/y"),
        ]:
            assert (await client.get(path)).json() == {"route": route}
        assert (await client.get("/hot/nothing/here")).status_code == 404


def test_a_router_matched_first_may_not_take_another_routes_path() -> None:
    # matched first, "/a/b/{x}" would answer "/a/b/1", which the "/a" router's "/b/{x}" answers now
    app = _app(("/a", ["/b/{x}", "/c"]), ("/a/b", ["/{x}"]))
    with pytest.raises(ValueError, match=re.escape("/a/b/{x} would be shadowed")):
        match_first(app, ("/a/b",))
    app = _app(("/a", ["/c"]), ("/a/b", ["/{x}"]))
    match_first(app, ("/a/b",))  # nothing else lives under /a/b

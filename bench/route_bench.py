"""What the web framework costs per metered call: the app in-process, the gateway stubbed out.

Builds the real app (`create_app`: every router, middleware and error handler) twice — with the
invocation routers matched first (`core/route_order.py`, as the hub runs) and in the declared
order (the code before that change) — gives it a gateway that answers at once, and drives it
through ASGI directly, with no server, socket, database or upstream. The time per request is
then routing, middleware, dependency resolution (the access token, the body, the headers), the
handler and the response: the framework's share of an invocation's CPU. Both apps run in the
same process, in alternating rounds, so their ratio means something on a shared machine.

Run:  .venv/bin/python bench/route_bench.py [--requests 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt

os.environ.setdefault("JWT_SECRET_KEY", "route-bench-" + "x" * 32)
os.environ.setdefault("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
os.environ.setdefault("ENVIRONMENT", "development")

from joyhub import main as hub_main
from joyhub.core import security
from joyhub.core.config import get_settings
from joyhub.openai_compat.catalog import ModelRef
from joyhub.tools.outcomes import Completed

ANSWER = (
    b'{"data":{"invocation_id":"00000000-0000-0000-0000-000000000000","output":{"text":"ok"}},"error":null}'
)

# name: (method, path, body); /health stands for every route that is not matched first
TARGETS = {
    "invoke": (
        "POST",
        f"/api/v1/tools/{uuid.uuid4()}/invoke",
        b'{"input": {"prompt": "hello benchmark world"}}',
    ),
    "chat": (
        "POST",
        "/api/v1/openai/chat/completions",
        b'{"model": "bench-llm", "messages": [{"role": "user", "content": "hello"}]}',
    ),
    "health": ("GET", "/health", b""),
}


class _Slot:
    def transfer(self) -> _Slot:
        return self

    def release(self) -> None:
        return None


class _Gate:
    async def enter(self) -> _Slot:
        return _Slot()


class _Store:
    engine = None


class _Catalog:
    async def resolve(self, engine: Any, model: str) -> ModelRef:
        return ModelRef(uuid.uuid4(), model)


class StubGateway:
    """Answers every invocation at once, as a completed call (what the route renders)."""

    gate = _Gate()
    store = _Store()

    async def invoke(self, request: Any, **_: Any) -> Completed:
        return Completed(result=None, body=ANSWER, quota=None)  # type: ignore[arg-type]  # never read


def build(hot_first: bool) -> Any:
    real = hub_main.match_first
    if not hot_first:
        hub_main.match_first = lambda app, prefixes: None  # type: ignore[assignment]
    try:
        app = hub_main.create_app(get_settings())
    finally:
        hub_main.match_first = real  # type: ignore[assignment]
    app.state.gateway = StubGateway()
    app.state.engine = object()  # the route's credential dependency reads it, never uses it
    app.state.openai_models = _Catalog()
    return app


def scope_for(method: str, path: str, body: bytes, token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"hub"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def per_request_us(app: Any, scope: dict[str, Any], body: bytes, n: int) -> float:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(set(statuses))}")
    return elapsed / n * 1e6


async def run(requests: int, rounds: int) -> None:
    settings = get_settings()
    now = int(time.time())
    claims = {"sub": str(uuid.uuid4()), "sid": str(uuid.uuid4()), "role": "user", "jti": "bench"}
    token = jwt.encode(
        {**claims, "type": "access", "iat": now, "exp": now + 3600},
        settings.secret_key(),
        algorithm=security.JWT_ALGORITHM,
    )
    apps = {"hot routers first": build(True), "declared order": build(False)}
    results: dict[tuple[str, str], list[float]] = {}
    for name, (method, path, body) in TARGETS.items():
        scope = scope_for(method, path, body, token)
        for app in apps.values():  # warm-up: caches, the schema the middleware reads once
            await per_request_us(app, scope, body, 300)
        for _ in range(rounds):
            for label, app in apps.items():
                results.setdefault((name, label), []).append(await per_request_us(app, scope, body, requests))
    print(f"{'route':8} {'app':18} {'µs / request (median of rounds)':>32}  rounds")
    for (name, label), values in results.items():
        rounds_text = " / ".join(f"{v:.0f}" for v in values)
        print(f"{name:8} {label:18} {statistics.median(values):32.1f}  {rounds_text}")
    for name in TARGETS:
        hot = statistics.median(results[(name, "hot routers first")])
        declared = statistics.median(results[(name, "declared order")])
        print(f"{name}: {declared - hot:+.1f} µs per request saved with the invocation routers matched first")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="requests per round and app")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runner: Callable[..., Any] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in the lock
        pass
    runner(run(args.requests, args.rounds))


if __name__ == "__main__":
    main()

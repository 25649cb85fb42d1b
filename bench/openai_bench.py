"""OpenAI-compatible surface benchmark (issue 17, API.md §12): what the hub's OpenAI adapter costs
over calling the model server directly, and how it compares with LiteLLM's proxy, full accounting
on (admission, limits, quota, usage log, rollups, settle — the hub as it runs in production).

1. a fast OpenAI-shaped upstream in its own process (`bench/load/openai_upstream.py`: fixed
   chat completion, 23 tokens of usage; streams of 14 chunks, the usage-only chunk when asked);
2. a fresh database on the PostgreSQL server of --pg-url, the hub as `joyhub serve --workers 2`
   on it, an `openai` tool `bench-llm` pointing at the upstream, --users callers (enterprise,
   limit out of reach) seeded straight into it;
3. LiteLLM's proxy from a separate virtualenv (--litellm, default /tmp/litellm-venv/bin/litellm;
   never the project's lock), `--num_workers 2`, no database, its config pointing at the same
   upstream;
4. parts:
   a. non-streaming chat completion at c=1: --requests sequential requests per target in
      interleaved blocks (direct, hub, LiteLLM), p50 each; the hub's overhead = hub - direct
      (target ≤ 3 ms);
   b. time to the first streamed chunk at c=1, the same way (target: hub - direct ≤ 3 ms);
   c. invocations/s at c=32 for --seconds each, hub and LiteLLM (target hub ≥ 3 x LiteLLM), by
      the closed-loop generator `bench/load/openai_loadgen.py` in its own process;
5. the accounting check: every 200 of the hub is one `success` usage log of 23 tokens, the
   subscriptions' `tokens_used` is their sum, nothing pending, reserved or in flight.

Run:  .venv/bin/python bench/openai_bench.py [--requests 400] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "bench" / "load"
sys.path.insert(0, str(LOAD))
from harness import (  # noqa: E402
    DEFAULT_PG,
    asyncpg_dsn,
    dump,
    free_port,
    fresh_database,
    ledger,
    machine,
    port_open,
    running_hub,
    seed,
)
from openai_upstream import TOKENS_PER_CALL  # noqa: E402

MODEL = "bench-llm"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say something about benchmarks"}]}
STREAM = {**CHAT, "stream": True}


def pct(data: list[float], p: float) -> float:
    data = sorted(data)
    return round(data[min(len(data) - 1, int(p * len(data)))], 3) if data else 0.0


@contextlib.contextmanager
def process(
    args: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[None]:
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not port_open(port):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"{args[0]} did not start" + (f":\n{log.read_text()[-3000:]}" if log else "")
                )
            time.sleep(0.1)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def litellm_proxy(binary: str, upstream_port: int) -> Iterator[tuple[int, str] | None]:
    """LiteLLM's proxy, 2 workers, no database, in front of the same upstream: its port and
    master key (it refuses to start without one, and callers authenticate as on the hub); None
    when it is not installed."""
    if not Path(binary).exists():
        print(
            f"LiteLLM not found at {binary}: install it with "
            "`pip install 'litellm[proxy]'` into a separate venv"
        )
        yield None
        return
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
    config = work / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_"))}
    master_key = f"sk-bench-{uuid.uuid4().hex}"
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_MODE="PRODUCTION",
        LITELLM_MASTER_KEY=master_key,
    )
    args = [binary, "--config", str(config), "--port", str(port), "--num_workers", "2"]
    with process(args, port, env, work / "litellm.log"):
        yield port, master_key


def _closed_by_peer(sock: Any) -> bool:
    """Whether the server has closed this idle keep-alive connection (readable at EOF)."""
    import select

    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _post(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str], stream: bool
) -> float:
    """One request on a keep-alive connection: seconds to the whole answer, or to the first
    streamed event (the rest is then read whole). A connection the server closed while it sat
    idle between blocks (uvicorn's keep-alive timeout is 5 s) is opened again first, untimed."""
    if conn.sock is not None and _closed_by_peer(conn.sock):
        conn.close()
    if conn.sock is None:
        conn.connect()
    started = time.perf_counter()
    conn.request("POST", path, body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {resp.read()[:300]!r}")
    if not stream:
        resp.read()
        return time.perf_counter() - started
    seen = b""
    while b"data:" not in seen:
        piece = resp.read1(65536)
        if not piece:
            raise RuntimeError("stream ended before its first event")
        seen += piece
    first = time.perf_counter() - started
    resp.read()
    return first


def c1(
    targets: dict[str, tuple[int, str, dict[str, str]]], body: dict[str, Any], requests: int, blocks: int
) -> dict[str, Any]:
    """Sequential requests to each target, interleaved in blocks; latencies in ms."""
    raw = json.dumps(body).encode()
    stream = bool(body.get("stream"))
    bodies = {name: json.dumps({"input": body}).encode() if name == "hub-json" else raw for name in targets}
    conns = {
        name: http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for name, (port, _, _) in targets.items()
    }
    lat: dict[str, list[float]] = {name: [] for name in targets}
    for name, (_, path, headers) in targets.items():  # warm-up: connections, caches
        for _ in range(20):
            _post(conns[name], path, bodies[name], {"Content-Type": "application/json", **headers}, stream)
    per_block = max(1, requests // blocks)
    for _ in range(blocks):
        for name, (_, path, headers) in targets.items():
            for _ in range(per_block):
                lat[name].append(
                    1000
                    * _post(
                        conns[name],
                        path,
                        bodies[name],
                        {"Content-Type": "application/json", **headers},
                        stream,
                    )
                )
    for conn in conns.values():
        conn.close()
    return {
        name: {"p50_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9), "p99_ms": pct(v, 0.99), "n": len(v)}
        for name, v in lat.items()
    }


def load(port: int, path: str, auth: list[str] | None, concurrency: int, seconds: float) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": path,
        "body": json.dumps(CHAT),
        "auth": auth,
        "concurrency": concurrency,
        "seconds": seconds,
    }
    out = subprocess.run(
        [sys.executable, str(LOAD / "openai_loadgen.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def add_tools(db_url: str, upstream_port: int) -> str:
    """The `openai` tool `bench-llm`, and a plain JSON tool at the same upstream's chat completion
    URL (the JSON API's invoke, for the adapter's own cost); the JSON tool's id."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        await conn.execute(
            "INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts,"
            " is_active, protocol, created_at, updated_at)"
            " VALUES ($1, $2, 'openai bench', $3, 30, 3, true, 'openai', now(), now())",
            uuid.uuid4(),
            MODEL,
            f"http://127.0.0.1:{upstream_port}/v1",
        )
        json_tool = uuid.uuid4()
        await conn.execute(
            "INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts,"
            " is_active, created_at, updated_at)"
            " VALUES ($1, 'bench-json', 'json bench', $2, 30, 3, true, now(), now())",
            json_tool,
            f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
        )
    finally:
        await conn.close()
    return str(json_tool)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-url", default=DEFAULT_PG)
    ap.add_argument("--requests", type=int, default=400, help="c=1 requests per target and part")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="c=32 duration per target")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    up_port = free_port()
    upstream_args = [sys.executable, str(LOAD / "openai_upstream.py"), str(up_port)]
    with process(upstream_args, up_port), fresh_database(args.pg_url) as db_url:
        seeded = asyncio.run(seed(db_url, users=args.users, upstream_url=None))
        json_tool = asyncio.run(add_tools(db_url, up_port))
        bearer = [f"Bearer {t}" for t in seeded.tokens]
        with running_hub(db_url, workers=args.workers) as hub, litellm_proxy(args.litellm, up_port) as lite:
            targets: dict[str, tuple[int, str, dict[str, str]]] = {
                "direct": (up_port, "/v1/chat/completions", {}),
                "hub": (hub.port, "/api/v1/openai/chat/completions", {"Authorization": bearer[0]}),
            }
            if lite is not None:
                targets["litellm"] = (lite[0], "/v1/chat/completions", {"Authorization": f"Bearer {lite[1]}"})
            print("a. non-streaming chat completion, c=1 …", flush=True)
            json_target = (hub.port, f"/api/v1/tools/{json_tool}/invoke", {"Authorization": bearer[0]})
            results["c1_chat"] = c1({**targets, "hub-json": json_target}, CHAT, args.requests, args.blocks)
            print(json.dumps(results["c1_chat"]), flush=True)
            print("b. time to first streamed chunk, c=1 …", flush=True)
            results["c1_ttfb"] = c1(targets, STREAM, args.requests, args.blocks)
            print(json.dumps(results["c1_ttfb"]), flush=True)
            print(f"c. invocations/s at c={args.concurrency}, {args.seconds:.0f} s each …", flush=True)
            results["load_during"] = os.getloadavg()
            hub_cpu0 = hub.group_cpu_seconds()
            results["c32_hub"] = load(
                hub.port, "/api/v1/openai/chat/completions", bearer, args.concurrency, args.seconds
            )
            results["c32_hub"]["hub_cpu_ms_per_call"] = round(
                1000 * (hub.group_cpu_seconds() - hub_cpu0) / max(1, results["c32_hub"]["requests"]), 3
            )
            print("hub", json.dumps(results["c32_hub"]), flush=True)
            if lite is not None:
                results["c32_litellm"] = load(
                    lite[0], "/v1/chat/completions", [f"Bearer {lite[1]}"], args.concurrency, args.seconds
                )
                print("litellm", json.dumps(results["c32_litellm"]), flush=True)
            results["c32_direct"] = load(
                up_port, "/v1/chat/completions", None, args.concurrency, min(args.seconds, 5)
            )
            print("direct", json.dumps(results["c32_direct"]), flush=True)
            time.sleep(1.0)
            book = asyncio.run(ledger(db_url))
        hub_ok = (
            results["c1_chat"]["hub"]["n"]
            + 20
            + results["c1_chat"]["hub-json"]["n"]
            + 20
            + results["c1_ttfb"]["hub"]["n"]
            + 20
            + results["c32_hub"]["statuses"].get("200", 0)
        )
        results["accounting"] = {
            **book,
            "hub_200s": hub_ok,
            "ok": book["success"] == hub_ok
            and book["log_tokens"] == book["tokens_used"] == hub_ok * TOKENS_PER_CALL
            and book["pending"] == book["tokens_reserved"] == book["inflight"] == 0
            and book["failed"] == 0,
        }
    c1r, tt = results["c1_chat"], results["c1_ttfb"]
    summary = {
        "chat_overhead_p50_ms": round(c1r["hub"]["p50_ms"] - c1r["direct"]["p50_ms"], 3),
        "json_invoke_overhead_p50_ms": round(c1r["hub-json"]["p50_ms"] - c1r["direct"]["p50_ms"], 3),
        "ttfb_overhead_p50_ms": round(tt["hub"]["p50_ms"] - tt["direct"]["p50_ms"], 3),
        "hub_rps_c32": results["c32_hub"]["rps"],
    }
    if "c32_litellm" in results:
        summary["litellm_rps_c32"] = results["c32_litellm"]["rps"]
        summary["hub_over_litellm"] = round(
            results["c32_hub"]["rps"] / max(0.1, results["c32_litellm"]["rps"]), 2
        )
    results["summary"] = summary
    print(json.dumps({"summary": summary, "accounting": results["accounting"]}, indent=2))
    dump(args.json, results)
    return 0 if results["accounting"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

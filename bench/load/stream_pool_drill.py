"""Drill: more streams on one worker than its upstream pool holds (BENCHMARKS.md, "Streaming",
finding 1).

One hub worker, `--streams` streams (default 530) of `--duration` s (default 60) at once on
tool A, whose timeout is 30 s. While they run, after `--check-at` s (40), one call of tool A and
one of tool B (another healthy tool), both without `stream`. What a fixed hub does: every
stream completes, and both calls answer 200. What this branch's base (main 053dd24) does: the
streams beyond the worker's 512 upstream connections wait for one, fail after 30 s with 504
TOOL_TIMEOUT, count as failures of the tool and open its circuit, so the call of A answers 503
TOOL_UNAVAILABLE ("circuit open") although its upstream is healthy, and the call of B waits for
a pooled connection too (504 after 30 s, or a late 200).

Exit status 0 when every stream completed and both calls answered 200, else 1.

    .venv/bin/python bench/load/stream_pool_drill.py [--streams 530] [--duration 60] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from harness import DEFAULT_PG, fresh_database, running_hub, seed  # noqa: E402
from sse_loadgen import Report, Spec, run_streams  # noqa: E402
from sse_upstream import sse_upstream  # noqa: E402
from stream_bench import UPSTREAM_BODY, Shape, World, add_tools  # noqa: E402


def call_once(port: int, tool_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """One call without `stream`: its status, error code and seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.monotonic()
    try:
        conn.request(
            "POST",
            f"/api/v1/tools/{tool_id}/invoke",
            body='{"input":' + UPSTREAM_BODY + "}",
            headers={**headers, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    error = body.get("error") or {}
    return {
        "status": resp.status,
        "code": error.get("code"),
        "message": error.get("message"),
        "seconds": round(time.monotonic() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--streams", type=int, default=530)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds each stream lasts")
    parser.add_argument("--check-at", type=float, default=40.0, help="when to call tools A and B")
    args = parser.parse_args()

    long, other = Shape(round(args.duration), 1.0), Shape(1, 0)
    with sse_upstream() as upstream, fresh_database(args.pg_url) as db_url:
        seeded = asyncio.run(seed(db_url, users=args.streams + 1, upstream_url=None))
        tools = asyncio.run(add_tools(db_url, upstream, [long, other]))
        headers = [{"Authorization": f"Bearer {t}"} for t in seeded.tokens]
        with running_hub(db_url, workers=args.workers, env={"SWEEP_INTERVAL_SECONDS": "3600"}) as hub:
            world = World(hub, db_url, upstream, headers[1:], headers[0], tools)
            spec = Spec(
                world.invoke_url(long),
                world.callers,
                '{"input":' + UPSTREAM_BODY + ',"stream":true}',
                "hub",
                connections=args.streams,
                stream_timeout=args.duration + 120,
            )
            box: list[Report] = []
            gen = threading.Thread(target=lambda: box.append(run_streams(spec)))
            gen.start()
            gen.join(args.check_at)
            results: dict[str, Any] = {}

            def check(name: str, shape: Shape) -> None:
                results[name] = call_once(hub.port, tools[shape], world.probe)

            # both at once: the second must not wait for the first's verdict
            calls = [threading.Thread(target=check, args=a) for a in (("tool A", long), ("tool B", other))]
            for t in calls:
                t.start()
            for t in calls:
                t.join()
            gen.join()
    report = box[0]
    print(f"streams: {report.streams} sent, {report.completed} completed, errors {report.errors or 0}")
    for name, res in results.items():
        print(f"{name} at {args.check_at:g} s, not streamed: {res}")
    ok = report.completed == report.streams and all(r["status"] == 200 for r in results.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

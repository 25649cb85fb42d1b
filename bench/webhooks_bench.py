"""Webhook benchmark (issue 16): dispatcher throughput, and invocations beside a black hole.

What it does, end to end (see bench/README.md):

1. creates a fresh database on the PostgreSQL server given by --pg-url (default: the system
   server) and starts `joyhub serve --workers 2` on it (the dispatcher runs in every worker,
   WEBHOOK_CONCURRENCY per worker), with --users callers (gateway_bench's seed) and one webhook
   endpoint per caller;
2. **dispatcher throughput**: the endpoints point at a fast local receiver (the mock upstream:
   200 on every POST, keep-alive, its own process); --events events are inserted in one
   transaction (their NOTIFY wakes the dispatchers at commit) and the clock runs until every one
   of the deliveries has succeeded — fan-out, claim, sign, POST, record, all included →
   deliveries/s (target ≥ 500 on 2 workers);
3. **invocations beside a black hole**: invocations/s at c=32 with no webhook traffic, then
   with every endpoint pointing at a receiver that accepts connections and never answers while
   events keep arriving (--event-rate per second), so every dispatcher slot is held by an
   attempt waiting out its 10 s timeout; then once more without (the same run, alternated;
   before a quiet run the pending deliveries are failed and their attempts left to time out).

Run:  .venv/bin/python bench/webhooks_bench.py [--events 20000] [--duration 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))
from gateway_bench import (  # noqa: E402
    BODY,
    JWT_SECRET,
    _admin_sql,
    _run,
    _seed,
    _serve_mock,
    free_port,
    group_cpu_seconds,
    measure,
    start_hub,
    stop,
)


async def _black_hole(port: int) -> None:
    """Accept every connection, read what comes, never answer."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def _serve(flag: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, __file__, flag, str(port)], start_new_session=True)
    time.sleep(0.5)
    return proc


async def _endpoints(db_url: str, user_ids: list[str], url: str) -> None:
    """One endpoint per caller, subscribed to `subscription.created`, its secret sealed as the
    hub seals it (the same server secret)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from joyhub.webhooks.secret_box import SecretBox, new_secret

    box = SecretBox(JWT_SECRET)
    eng = create_async_engine(db_url)
    async with eng.begin() as conn:
        for user_id in user_ids:
            endpoint_id = uuid.uuid4()
            await conn.execute(
                text(
                    "INSERT INTO webhook_endpoints (id, owner_id, scope, url, events, is_active, secret,"
                    " created_at, updated_at) VALUES (:id, :u, 'user', :url,"
                    " ARRAY['subscription.created'], true, :secret, now(), now())"
                ),
                {
                    "id": endpoint_id,
                    "u": uuid.UUID(user_id),
                    "url": url,
                    "secret": box.seal(endpoint_id, new_secret()[1]),
                },
            )
    await eng.dispose()


async def _sql(db_url: str, sql: str, **params: Any) -> Any:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(db_url)
    async with eng.begin() as conn:
        result = await conn.execute(text(sql), params)
        value = result.scalar() if result.returns_rows else None
    await eng.dispose()
    return value


_EVENTS = (
    "INSERT INTO webhook_events (id, type, user_id, data, created_at)"
    " SELECT gen_random_uuid(), 'subscription.created', u.id, jsonb_build_object('n', g), now()"
    " FROM generate_series(1, :n) AS g"
    " JOIN (SELECT id, row_number() OVER () - 1 AS k FROM users) AS u"
    " ON u.k = g % (SELECT count(*) FROM users)"
)


async def _throughput(db_url: str, events: int, hub_pid: int) -> dict[str, Any]:
    """Insert `events` events at once; time until all their deliveries succeeded."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(db_url)
    cpu0 = group_cpu_seconds(hub_pid)
    start = time.perf_counter()
    async with eng.begin() as conn:
        await conn.execute(text(_EVENTS), {"n": events})
    inserted = time.perf_counter()
    done = 0
    while done < events:
        await asyncio.sleep(0.1)
        async with eng.connect() as conn:
            done = int(
                (
                    await conn.execute(
                        text("SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'")
                    )
                ).scalar_one()
            )
        if time.perf_counter() - start > 600:
            break
    elapsed = time.perf_counter() - start
    cpu = group_cpu_seconds(hub_pid) - cpu0
    async with eng.connect() as conn:
        failed = int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM webhook_deliveries WHERE status <> 'succeeded'")
                )
            ).scalar_one()
        )
        await conn.execute(text("DELETE FROM webhook_events"))
        await conn.commit()
    await eng.dispose()
    return {
        "events": events,
        "succeeded": done,
        "not_succeeded": failed,
        "insert_s": round(inserted - start, 3),
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(done / elapsed, 1),
        "hub_cpu_ms_per_delivery": round(cpu * 1000 / max(done, 1), 3),
    }


def _inserter(db_url: str, rate: float, stop_flag: threading.Event) -> None:
    """Keep events arriving at `rate` per second (each is delivered to its caller's endpoint),
    until told to stop."""

    async def loop() -> None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        eng = create_async_engine(db_url)
        batch = max(1, int(rate / 10))
        while not stop_flag.is_set():
            async with eng.begin() as conn:
                await conn.execute(text(_EVENTS), {"n": batch})
            await asyncio.sleep(0.1)
        await eng.dispose()

    asyncio.run(loop())


def policy_timeout() -> float:
    from joyhub.webhooks.policy import ATTEMPT_TIMEOUT_SECONDS

    return ATTEMPT_TIMEOUT_SECONDS


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=32, help="callers, one endpoint each")
    parser.add_argument("--events", type=int, default=20000, help="events of the throughput run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per invocation run")
    parser.add_argument("--event-rate", type=float, default=200.0, help="events/s beside the black hole")
    parser.add_argument("--loadgen", default="auto", help="wrk | python | auto (wrk when installed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--serve-mock", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-blackhole", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mock is not None:
        _run(_serve_mock(args.serve_mock))
        return 0
    if args.serve_blackhole is not None:
        _run(_black_hole(args.serve_blackhole))
        return 0
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "python")

    receiver_port, hole_port = free_port(), free_port()
    receiver = _serve("--serve-mock", receiver_port)
    hole = _serve("--serve-blackhole", hole_port)
    upstream_url = f"http://127.0.0.1:{receiver_port}/v1/run"
    from sqlalchemy.engine import make_url

    db_name = f"joyhub_bench_{uuid.uuid4().hex[:8]}"
    db_url = make_url(args.pg_url).set(database=db_name).render_as_string(hide_password=False)
    asyncio.run(_admin_sql(args.pg_url, f'CREATE DATABASE "{db_name}"'))
    results: dict[str, Any] = {
        "load_generator": tool,
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "loadavg_at_start": os.getloadavg(),
    }
    hub = None
    try:
        port = free_port()
        hub = start_hub(db_url, args.workers, port, None)
        seeded = asyncio.run(_seed(db_url, upstream_url, args.users))
        asyncio.run(_endpoints(db_url, seeded["user_ids"], f"http://127.0.0.1:{receiver_port}/hook"))

        asyncio.run(_throughput(db_url, 1000, hub.pid))  # warm-up: pools, connections, statements
        results["dispatcher"] = asyncio.run(_throughput(db_url, args.events, hub.pid))
        print(f"dispatcher, {args.workers} workers: {results['dispatcher']}")

        url = f"http://127.0.0.1:{port}/api/v1/tools/{seeded['tool_id']}/invoke"
        every = [
            {"Content-Type": "application/json", "Authorization": f"Bearer {t}"} for t in seeded["tokens"]
        ]
        measure(tool, url, every, BODY, 32, 3)  # warm-up
        asyncio.run(
            _sql(db_url, "UPDATE webhook_endpoints SET url = :u", u=f"http://127.0.0.1:{hole_port}/hook")
        )
        runs: list[dict[str, Any]] = []
        for label in ("quiet", "black_hole", "quiet", "black_hole"):
            flag = threading.Event()
            feeder = threading.Thread(target=_inserter, args=(db_url, args.event_rate, flag), daemon=True)
            if label == "black_hole":
                feeder.start()
                time.sleep(2)  # let the dispatchers fill every slot
            else:  # no retries of the last black-hole run either (its attempts in flight time out)
                asyncio.run(
                    _sql(db_url, "UPDATE webhook_deliveries SET status = 'failed' WHERE status = 'pending'")
                )
                time.sleep(policy_timeout())
            m = measure(tool, url, every, BODY, 32, args.duration)
            hanging = asyncio.run(
                _sql(
                    db_url,
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending' AND attempts > 0",
                )
            )
            if label == "black_hole":
                flag.set()
                feeder.join()
            runs.append({"run": label, **m, "deliveries_attempted_pending": hanging})
            print(
                f"invocations c=32 {label}: {m['rps']:.0f}/s p50 {m['p50_ms']:.2f} ms"
                f" p99 {m['p99_ms']:.2f} ms errors {int(m['errors'])}"
                f" (deliveries pending after an attempt: {hanging})"
            )
        results["invocations"] = runs
        quiet = [r["rps"] for r in runs if r["run"] == "quiet"]
        holed = [r["rps"] for r in runs if r["run"] == "black_hole"]
        results["black_hole_vs_quiet"] = round(sum(holed) / sum(quiet), 3)
        print(f"invocations/s beside the black hole vs quiet: {results['black_hole_vs_quiet']:.3f}")
    finally:
        if hub is not None:
            stop(hub)
        for proc in (receiver, hole):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        asyncio.run(_admin_sql(args.pg_url, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results["dispatcher"]["not_succeeded"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

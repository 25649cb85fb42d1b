"""Scenario (c): a login burst, and what it does to everybody else (`/health` latency meanwhile).

    .venv/bin/python bench/load/login_burst.py [--logins 200] [--over 10] [--bcrypt-rounds 12]

1. a fresh database on the system PostgreSQL with `--logins` users whose password is hashed at
   `--bcrypt-rounds` (12 is the production default of BCRYPT_ROUNDS);
2. `joyhub serve --workers N` with the same BCRYPT_ROUNDS;
3. `/health` is polled on one keep-alive connection every `--poll-ms` ms: `--baseline` seconds
   alone, then during the burst: `--logins` POST /auth/login (distinct users, correct
   password) sent open-loop, evenly spread over `--over` seconds, each on its own connection;
4. reports the logins' status and latency, how long the burst took to drain, the login rate
   achieved, and `/health` p50/p99/max before and during the burst; `GET /users/me` of another
   (already logged-in) user is polled too, every 5 `--poll-ms`, to show what the burst does to
   requests that need a database connection.

bcrypt is the point: each login costs one bcrypt verification (~0.2 s of one core at cost 12 on
this machine), run off the event loop on a small thread pool per worker, so a burst queues
behind itself while the event loop keeps answering everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import harness
import httpx
from loadgen import pct


async def poll(
    port: int,
    every: float,
    stop: asyncio.Event,
    out: list[tuple[float, float, int]],
    path: str = "/health",
    token: str | None = None,
) -> None:
    """GET `path` on one keep-alive connection every `every` s: (time, latency ms, status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            t1 = time.perf_counter()
            out.append((time.monotonic(), (t1 - t0) * 1000, int(head[9:12])))
            await asyncio.sleep(max(0.0, every - (t1 - t0)))
    finally:
        writer.close()


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(pct(values, 50), 2),
        "p99_ms": round(pct(values, 99), 2),
        "max_ms": round(max(values), 2) if values else float("nan"),
    }


async def burst(port: int, emails: list[str], token: str, args: argparse.Namespace) -> dict[str, Any]:
    samples: list[tuple[float, float, int]] = []
    me_samples: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    every = args.poll_ms / 1000
    poller = asyncio.create_task(poll(port, every, stop, samples))
    # a user who is not logging in, reading their profile meanwhile (needs a pooled connection)
    me_poller = asyncio.create_task(poll(port, every * 5, stop, me_samples, "/api/v1/users/me", token))
    await asyncio.sleep(args.baseline)
    burst_start = time.monotonic()
    spacing = args.over / len(emails)
    results: list[tuple[int, float, float]] = []  # status, latency ms, finished (monotonic)
    limits = httpx.Limits(max_connections=len(emails), max_keepalive_connections=0)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as c:

        async def login(i: int, email: str) -> None:
            await asyncio.sleep(max(0.0, burst_start + i * spacing - time.monotonic()))
            t0 = time.monotonic()
            r = await c.post("/api/v1/auth/login", json={"email": email, "password": harness.PASSWORD})
            t1 = time.monotonic()
            results.append((r.status_code, (t1 - t0) * 1000, t1))

        await asyncio.gather(*(login(i, e) for i, e in enumerate(emails)))
    burst_end = time.monotonic()
    await asyncio.sleep(1.0)
    stop.set()
    await poller
    await me_poller

    before = [ms for t, ms, _ in samples if t < burst_start]
    during = [ms for t, ms, _ in samples if burst_start <= t <= burst_end]
    me_before = [ms for t, ms, _ in me_samples if t < burst_start]
    me_during = [ms for t, ms, _ in me_samples if burst_start <= t <= burst_end]
    me_statuses: dict[str, int] = {}
    for t, _, status in me_samples:
        if burst_start <= t <= burst_end:
            me_statuses[str(status)] = me_statuses.get(str(status), 0) + 1
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    drained = burst_end - burst_start
    return {
        "logins": len(emails),
        "offered_per_second": round(len(emails) / args.over, 1),
        "statuses": statuses,
        "login_latency": stats([ms for _, ms, _ in results]),
        "burst_drained_seconds": round(drained, 2),
        "logins_per_second_achieved": round(len(emails) / drained, 1),
        "health_before": stats(before),
        "health_during": stats(during),
        "users_me_before": stats(me_before),
        "users_me_during": {**stats(me_during), "statuses": me_statuses},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=harness.DEFAULT_PG)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--over", type=float, default=10.0, help="seconds the logins are spread over")
    parser.add_argument("--bcrypt-rounds", type=int, default=12)
    parser.add_argument("--baseline", type=float, default=5.0)
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    print(f"waiting for load < {args.max_load}: {harness.wait_quiet(args.max_load):.2f}", flush=True)
    results: dict[str, Any] = {"args": vars(args), "machine": harness.machine()}
    with harness.fresh_database(args.pg_url) as db_url:
        seeded = asyncio.run(
            harness.seed(db_url, users=args.logins + 1, upstream_url=None, bcrypt_rounds=args.bcrypt_rounds)
        )
        env = {"BCRYPT_ROUNDS": str(args.bcrypt_rounds)}
        with harness.running_hub(db_url, workers=args.workers, env=env) as hub:
            # one login first, so both workers' lazy set-up is not billed to the burst
            with httpx.Client(base_url=hub.base) as c:
                c.post("/api/v1/auth/login", json={"email": seeded.emails[0], "password": "wrong-password"})
            emails, reader_token = seeded.emails[: args.logins], seeded.tokens[-1]
            results["burst"] = harness.run_loop(burst(hub.port, emails, reader_token, args))
    b = results["burst"]
    print(
        f"{b['logins']} logins offered at {b['offered_per_second']}/s (bcrypt {args.bcrypt_rounds}, "
        f"{args.workers} workers): statuses {b['statuses']}, drained in {b['burst_drained_seconds']} s "
        f"({b['logins_per_second_achieved']}/s); login p50 {b['login_latency']['p50_ms']:.0f} ms "
        f"p99 {b['login_latency']['p99_ms']:.0f} ms"
    )
    print(f"/health before: {b['health_before']}")
    print(f"/health during: {b['health_during']}")
    print(f"/users/me before: {b['users_me_before']}")
    print(f"/users/me during: {b['users_me_during']}")
    harness.dump(args.json, results)
    return 0 if b["statuses"] == {"200": args.logins} else 1


if __name__ == "__main__":
    sys.exit(main())

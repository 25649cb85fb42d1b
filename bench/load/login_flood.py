"""Scenario (d): one address floods the login with junk while real users log in from others.

    .venv/bin/python bench/load/login_flood.py [--duration 20] [--flooders 32] [--users 4]
                                               [--bcrypt-rounds 12] [--workers 2] [--budget 30]

Issue 12, item 5. Every junk login names a fresh random email, so the per-(email, address)
failure throttle never sees the same bucket twice: before the per-address password-work budget
each one cost a bcrypt verification, and a few per second kept real users' logins at 503.

1. a fresh database on the system PostgreSQL with `--users` real accounts (password hashed at
   `--bcrypt-rounds`; 12 is the production default);
2. `joyhub serve --workers N` with that cost, once with PASSWORD_WORK_MAX_PER_ADDRESS =
   `--budget` (the default, 30 per minute) and once with the budget out of the way (10^6: what
   the hub did before), everything else equal;
3. `--flooders` closed-loop connections send junk logins from 127.0.0.66 for `--duration`
   seconds, while each real user logs in (correct password) once a second from an address of
   its own (127.0.0.10, .11, …) — source addresses on loopback, so the hub sees distinct
   clients without any proxy header;
4. reported per run: the real logins' statuses and latency, the junk answers by status, and how
   many junk attempts reached bcrypt (401 = hashed, 429 = refused before the hash, 503 = the
   bcrypt line was full).

Exit status 1 if, with the budget on, a real login failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections import Counter
from typing import Any

import harness
import httpx
from loadgen import pct

FLOOD_ADDRESS = "127.0.0.66"
USER_ADDRESS_BASE = 10  # 127.0.0.10, .11, ...
UNLIMITED_BUDGET = "1000000"


async def flood(port: int, connections: int, until: float) -> Counter[int]:
    """Junk logins (fresh email each time) on `connections` keep-alive connections."""
    statuses: Counter[int] = Counter()
    transport = httpx.AsyncHTTPTransport(
        local_address=FLOOD_ADDRESS, limits=httpx.Limits(max_connections=connections)
    )
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}", timeout=60) as c:

        async def loop() -> None:
            while time.monotonic() < until:
                body = {"email": f"junk-{uuid.uuid4().hex[:12]}@example.com", "password": "Junk-Pass-123!"}
                try:
                    r = await c.post("/api/v1/auth/login", json=body)
                    statuses[r.status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1

        await asyncio.gather(*(loop() for _ in range(connections)))
    return statuses


async def real_user(port: int, index: int, email: str, until: float) -> list[tuple[int, float]]:
    """One correct login a second from this user's own address: (status, latency ms) each."""
    address = f"127.0.0.{USER_ADDRESS_BASE + index}"
    transport = httpx.AsyncHTTPTransport(local_address=address)
    out: list[tuple[int, float]] = []
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        next_at = time.monotonic() + 1.0  # let the flood build up first
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            started = time.perf_counter()
            try:
                r = await c.post("/api/v1/auth/login", json={"email": email, "password": harness.PASSWORD})
                out.append((r.status_code, (time.perf_counter() - started) * 1000))
            except httpx.HTTPError:
                out.append((0, (time.perf_counter() - started) * 1000))
            next_at += 1.0
    return out


async def scenario(port: int, emails: list[str], args: argparse.Namespace) -> dict[str, Any]:
    until = time.monotonic() + args.duration
    junk, *users = await asyncio.gather(
        flood(port, args.flooders, until),
        *(real_user(port, i, email, until) for i, email in enumerate(emails)),
    )
    real = [sample for samples in users for sample in samples]
    latencies = [ms for status, ms in real if status == 200]
    return {
        "real_logins": len(real),
        "real_statuses": dict(Counter(str(status) for status, _ in real)),
        "real_p50_ms": round(pct(latencies, 50), 1),
        "real_p99_ms": round(pct(latencies, 99), 1),
        "real_max_ms": round(max(latencies, default=float("nan")), 1),
        "junk_statuses": {str(k): v for k, v in sorted(junk.items())},
        "junk_hashed": junk.get(401, 0),
        "junk_per_second": round(sum(junk.values()) / args.duration, 1),
    }


def run(db_url: str, emails: list[str], budget: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {"BCRYPT_ROUNDS": str(args.bcrypt_rounds), "PASSWORD_WORK_MAX_PER_ADDRESS": budget}
    with harness.running_hub(db_url, workers=args.workers, env=env) as hub:
        return harness.run_loop(scenario(hub.port, emails, args))  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=harness.DEFAULT_PG)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--flooders", type=int, default=32)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--bcrypt-rounds", type=int, default=12)
    parser.add_argument("--budget", default="30")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    print(f"waiting for load < {args.max_load}: {harness.wait_quiet(args.max_load):.2f}", flush=True)
    results: dict[str, Any] = {"args": vars(args), "machine": harness.machine()}
    with harness.fresh_database(args.pg_url) as db_url:
        seeded = asyncio.run(
            harness.seed(db_url, users=args.users, upstream_url=None, bcrypt_rounds=args.bcrypt_rounds)
        )
        for label, budget in (("budget", args.budget), ("no budget", UNLIMITED_BUDGET)):
            print(f"-- {label} (PASSWORD_WORK_MAX_PER_ADDRESS={budget})", flush=True)
            res = run(db_url, seeded.emails, budget, args)
            results[label] = res
            print(
                f"   real logins {res['real_statuses']} p50 {res['real_p50_ms']} ms"
                f" p99 {res['real_p99_ms']} ms;"
                f" junk {res['junk_per_second']}/s {res['junk_statuses']}, hashed {res['junk_hashed']}",
                flush=True,
            )
    harness.dump(args.json, results)
    ok = results["budget"]["real_statuses"] == {"200": results["budget"]["real_logins"]}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time the usage and admin-stats endpoints on a seeded database (see bench/seed_usage.py).

    python bench/usage_bench.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/joyhub_bench

It starts the hub (`joyhub serve`, one worker, LOG_LEVEL=WARNING) on a free port against that
database with a JWT secret of its own, mints access tokens for the heavy user and the admin
(an `auth_sessions` row + `create_access_token`, as a login would), warms up, then sends
`--requests` sequential requests per endpoint with httpx and prints p50/p95/p99/max in ms,
against the targets of the issue. `--json FILE` also writes the figures. Exit status 1 if a
request failed or (with `--strict`) a target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from seed_usage import ADMIN_EMAIL, HEAVY_EMAIL, asyncpg_dsn, sqlalchemy_url  # noqa: E402

from joyhub.core.security import create_access_token  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def mint_tokens(url: str, secret: str) -> dict[str, str]:
    """An access token on a fresh session for the heavy user and for the admin."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        tokens = {}
        for label, email in (("heavy", HEAVY_EMAIL), ("admin", ADMIN_EMAIL)):
            row = await conn.fetchrow("SELECT id, role FROM users WHERE email = $1", email)
            if row is None:
                raise SystemExit(f"{email} not found: seed the database with bench/seed_usage.py first")
            sid = uuid.uuid4()
            await conn.execute(
                "INSERT INTO auth_sessions (id, user_id, created_at, user_agent) VALUES ($1, $2, $3, $4)",
                sid,
                row["id"],
                datetime.now(UTC),
                "usage-bench",
            )
            tokens[label] = create_access_token(
                user_id=row["id"], session_id=sid, role=row["role"], secret=secret, ttl=timedelta(minutes=60)
            )
        return tokens
    finally:
        await conn.close()


def start_server(url: str, port: int, secret: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": sqlalchemy_url(url),
        "JWT_SECRET_KEY": secret,
        "LOG_LEVEL": "WARNING",
        "REDIS_URL": "",
        "ADMIN_EMAIL": "",
        "ADMIN_PASSWORD": "",
    }
    exe = ROOT / ".venv" / "bin" / "joyhub"
    cmd = [str(exe) if exe.exists() else "joyhub", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"the hub exited with {proc.returncode}:\n{err[-3000:]}")
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    raise SystemExit("the hub did not become ready in time")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


async def time_endpoint(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], n: int, warmup: int
) -> dict[str, float]:
    for _ in range(warmup):
        r = await client.get(path, headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"GET {path} -> {r.status_code}: {r.text[:500]}")
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get(path, headers=headers)
        samples.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"GET {path} -> {r.status_code}: {r.text[:500]}")
    return {
        "n": n,
        "p50": statistics.median(samples),
        "p95": pct(samples, 95),
        "p99": pct(samples, 99),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


async def time_export(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> dict[str, float]:
    t0 = time.perf_counter()
    rows = size = 0
    first_byte = None
    async with client.stream("GET", path, headers=headers) as r:
        if r.status_code != 200:
            raise SystemExit(f"GET {path} -> {r.status_code}")
        async for chunk in r.aiter_bytes():
            if first_byte is None:
                first_byte = (time.perf_counter() - t0) * 1000
            size += len(chunk)
            rows += chunk.count(b"\n")
    seconds = time.perf_counter() - t0
    return {
        "rows": rows - 1,
        "mb": size / 1e6,
        "seconds": seconds,
        "rows_per_s": (rows - 1) / seconds,
        "first_byte_ms": first_byte or 0.0,
    }


async def run(args: argparse.Namespace) -> int:
    secret = secrets.token_urlsafe(48)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args.database_url, port, secret)
    try:
        await wait_ready(base, proc)
        tokens = await mint_tokens(args.database_url, secret)
        heavy = {"Authorization": f"Bearer {tokens['heavy']}"}
        admin = {"Authorization": f"Bearer {tokens['admin']}"}
        now = datetime.now(UTC)
        today = now.date()
        year_ago = today - timedelta(days=365)
        week_ago = (now - timedelta(days=7)).replace(microsecond=0)
        cases = [
            ("GET /usage/summary (heavy user, billing period)", "/api/v1/usage/summary", heavy, 20.0),
            (
                "GET /usage/timeseries day, last year (heavy)",
                f"/api/v1/usage/timeseries?granularity=day&start_date={year_ago}&end_date={today}",
                heavy,
                20.0,
            ),
            (
                "GET /usage/timeseries hour, last 7 days (heavy)",
                "/api/v1/usage/timeseries?granularity=hour&start_date="
                f"{week_ago.strftime('%Y-%m-%dT%H:%M:%SZ')}&end_date={now.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                heavy,
                20.0,
            ),
            ("GET /usage first page (heavy)", "/api/v1/usage?limit=20", heavy, 30.0),
            ("GET /admin/usage/stats last 30 days", "/api/v1/admin/usage/stats", admin, 100.0),
        ]
        extra = [
            (
                "GET /usage/summary, last year (heavy)",
                f"/api/v1/usage/summary?start_date={year_ago}&end_date={today}",
                heavy,
                None,
            ),
            ("GET /usage?status=timeout (heavy)", "/api/v1/usage?status=timeout", heavy, None),
            ("GET /usage page 50 (heavy)", "/api/v1/usage?offset=1000&limit=20", heavy, None),
            ("GET /admin/users first page", "/api/v1/admin/users", admin, None),
            ("GET /admin/users?search=user12", "/api/v1/admin/users?search=user12", admin, None),
            (
                "GET /admin/usage/stats 366 days",
                f"/api/v1/admin/usage/stats?start_date={year_ago}&end_date={today}",
                admin,
                None,
            ),
        ]
        results = []
        failed = False
        load_start = os.getloadavg()
        print(f"load average at start: {load_start[0]:.2f} (1 min), {os.cpu_count()} CPUs", flush=True)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for label, path, headers, target in cases + (extra if not args.only_targets else []):
                figures = await time_endpoint(client, path, headers, args.requests, args.warmup)
                ok = target is None or figures["p95"] <= target
                failed |= not ok
                results.append(
                    {"endpoint": label, "path": path, "target_p95_ms": target, **figures, "ok": ok}
                )
                mark = "" if target is None else ("  ok" if ok else "  MISSED")
                tgt = "" if target is None else f"(target {target:.0f})"
                print(
                    f"{label:52s} p50 {figures['p50']:7.1f}  p95 {figures['p95']:7.1f} {tgt:13s}"
                    f" p99 {figures['p99']:7.1f}  max {figures['max']:7.1f} ms{mark}",
                    flush=True,
                )
            export = None
            if args.export:
                export = await time_export(client, "/api/v1/usage/export", heavy)
                print(
                    f"GET /usage/export (heavy, all history): {export['rows']:,.0f} rows,"
                    f" {export['mb']:.0f} MB in {export['seconds']:.1f}s ({export['rows_per_s']:,.0f} rows/s,"
                    f" first byte {export['first_byte_ms']:.0f} ms)",
                    flush=True,
                )
        load_end = os.getloadavg()
        print(f"load average at end: {load_end[0]:.2f} (1 min)", flush=True)
        if args.json:
            report = {"results": results, "export": export, "load_average": [load_start[0], load_end[0]]}
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 1 if failed and args.strict else 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--requests", type=int, default=200, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--only-targets", action="store_true", help="skip the untargeted extra endpoints")
    parser.add_argument("--export", action="store_true", help="also time a full CSV export of the heavy user")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()

"""Gateway benchmark: overhead at concurrency 1 and throughput at concurrency 32 (issue 5).

What it does, end to end (see bench/README.md):

1. starts a fast mock upstream (raw asyncio + uvloop, its own process) answering every POST with
   `{"result": "ok", "usage": {"total_tokens": 5}}`;
2. creates a fresh database on the PostgreSQL server given by --pg-url (default: the system
   server on 127.0.0.1:5432) and starts the hub with `joyhub serve --workers N` on it
   (LOG_LEVEL=WARNING, full accounting on), for each N of --workers;
3. puts a user with an enterprise subscription (limit raised so the run never hits it), a
   session and a tool pointing at the mock straight into the database;
4. measures with wrk (when installed: `apt-get install -y wrk`) or else with the Python load
   generator in this file (run as a separate process):
   - concurrency 1: direct upstream latency p50/p99 vs via-hub p50/p99 -> gateway overhead;
   - concurrency 32: invocations/s and errors;
5. checks the accounting: after the timed runs, a fixed number of calls at concurrency 32 with
   the Python generator (which waits for every response, so the count is exact) must add
   exactly that many `success` usage logs, the subscription's tokens_used must equal the sum
   of the logs, and nothing may stay reserved or pending.

Run:  .venv/bin/python bench/gateway_bench.py [--duration 10] [--workers 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
JWT_SECRET = "bench-secret-key-that-is-long-enough-0123456789abcdef"
BODY = b'{"input":{"text":"hello benchmark world"}}'
UPSTREAM_BODY = b'{"text":"hello benchmark world"}'


# ---------------------------------------------------------------------------- mock upstream
# The mock upstream (raw asyncio, keep-alive, `usage.total_tokens = 5`) is the load harness's,
# so both benchmarks measure against the same upstream.
sys.path.insert(0, str(ROOT / "bench" / "load"))
from harness import _serve_mock  # noqa: E402
from harness import run_loop as _run  # noqa: E402

# ------------------------------------------------------------------ python load generator


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))]


async def _one_connection(
    host: str, port: int, request: bytes, deadline: float, budget: list[int], out: LoadResult
) -> None:  # one keep-alive connection, one request at a time
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and budget[0] != 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            out.latencies_ms.append((time.perf_counter() - t0) * 1000)
            out.requests += 1
            if status == 200:
                out.ok += 1
            else:
                out.errors += 1
    finally:
        writer.close()


async def _load(
    url: str, headers: list[dict[str, str]], body: bytes, concurrency: int, seconds: float, total: int
) -> LoadResult:
    """Closed-loop load: `concurrency` keep-alive connections, each waiting for its response.

    Connection i sends `headers[i % len(headers)]` (one caller per connection when there are as
    many header sets as connections). Stops after `seconds` or after `total` requests (total < 0:
    no limit); every request sent is answered before it returns, so counts are exact.
    """
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    host, port, path = m.group(1), int(m.group(2)), m.group(3)

    def request(hdrs: dict[str, str]) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    out = LoadResult()
    budget = [total]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _one_connection(host, port, request(headers[i % len(headers)]), deadline, budget, out)
            for i in range(concurrency)
        )
    )
    out.seconds = time.perf_counter() - started
    return out


def python_load(
    url: str, headers: list[dict[str, str]], body: bytes, concurrency: int, seconds: float, total: int = -1
) -> LoadResult:
    """Run the Python load generator in its own process (so it does not share our GIL)."""
    spec = json.dumps(
        {"url": url, "headers": headers, "body": body.decode(), "c": concurrency, "s": seconds, "n": total}
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--loadgen-spec", spec], capture_output=True, text=True, check=True
    )
    data = json.loads(proc.stdout)
    return LoadResult(**data)


# ------------------------------------------------------------------------------- wrk


def _wrk_ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", value)
    assert m, value
    n = float(m.group(1))
    return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[m.group(2)]


def wrk_load(
    url: str, headers: list[dict[str, str]], body: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    """wrk with a Lua script that rotates through the header sets (one per caller)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f"local body = {json.dumps(body.decode())}\n")
        f.write("local sets = {\n")
        for hdrs in headers:
            f.write(
                "  {" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in hdrs.items()) + "},\n"
            )
        f.write("}\n")
        f.write(
            "local i = 0\n"
            "function init(args) i = math.random(#sets) end\n"
            "function request()\n"
            "  i = i % #sets + 1\n"
            '  return wrk.format("POST", nil, sets[i], body)\n'
            "end\n"
        )
        script = f.name
    try:
        threads = min(concurrency, 2)
        proc = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(seconds)}s", "--latency", "-s", script, url],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script)
    text = proc.stdout
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M))
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    return {
        "p50_ms": _wrk_ms(pct["50"]),
        "p99_ms": _wrk_ms(pct["99"]),
        "rps": rps,
        "requests": total,
        "errors": errors,
    }


def measure(
    tool: str, url: str, headers: list[dict[str, str]], body: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    if tool == "wrk":
        return wrk_load(url, headers, body, concurrency, seconds)
    r = python_load(url, headers, body, concurrency, seconds)
    return {
        "p50_ms": r.pct(50),
        "p99_ms": r.pct(99),
        "rps": r.rps,
        "requests": r.requests,
        "errors": r.errors,
    }


# --------------------------------------------------------------------------- the hub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start_hub(db_url: str, workers: int, port: int, redis_url: str | None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "LOG_LEVEL": "WARNING",
        "JWT_SECRET_KEY": JWT_SECRET,
        "ENVIRONMENT": "development",
        "SWEEP_INTERVAL_SECONDS": "3600",
        # 20 connections per worker: enough for concurrency 32, and polite on a shared server
        "DB_POOL_SIZE": "16",
        "DB_MAX_OVERFLOW": "4",
    }
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [str(VENV_BIN / "joyhub"), "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of every live process in the process group (the hub's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # field 5 (pgrp) counted after the command name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _admin_sql(pg_url: str, sql: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(pg_url, isolation_level="AUTOCOMMIT")
    async with eng.connect() as conn:
        await conn.execute(text(sql))
    await eng.dispose()


async def _seed(db_url: str, upstream_url: str, users: int) -> dict[str, Any]:
    """`users` callers (user + session + enterprise subscription, limit raised so the run never
    reaches it) and one tool pointing at the mock; returns the tool id, user ids and tokens."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    sys.path.insert(0, str(ROOT / "src"))
    from joyhub.core.security import create_access_token, hash_password_sync

    tool_id = uuid.uuid4()
    password_hash = hash_password_sync("x", 4)
    user_ids: list[str] = []
    tokens: list[str] = []
    eng = create_async_engine(db_url)
    async with eng.begin() as conn:
        await conn.execute(text("UPDATE plans SET token_limit = 1000000000000000 WHERE code = 'enterprise'"))
        await conn.execute(
            text(
                "INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts,"
                " is_active, created_at, updated_at) VALUES (:id, 'bench-echo', 'benchmark mock',"
                " :url, 30, 3, true, now(), now())"
            ),
            {"id": tool_id, "url": upstream_url},
        )
        for n in range(users):
            user_id, session_id = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                text(
                    "INSERT INTO users (id, name, email, password_hash, role, is_active, created_at,"
                    " updated_at) VALUES (:id, 'Bench', :email, :ph, 'user', true, now(), now())"
                ),
                {"id": user_id, "email": f"bench-{n}-{user_id.hex[:6]}@example.com", "ph": password_hash},
            )
            await conn.execute(
                text("INSERT INTO auth_sessions (id, user_id, created_at) VALUES (:id, :u, now())"),
                {"id": session_id, "u": user_id},
            )
            await conn.execute(
                text(
                    "INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used,"
                    " tokens_reserved, inflight, current_period_start, current_period_end,"
                    " cancel_at_period_end, created_at, updated_at) VALUES (:id, :u, 'enterprise',"
                    " 'active', 0, 0, 0, now(), now() + interval '30 days', false, now(), now())"
                ),
                {"id": uuid.uuid4(), "u": user_id},
            )
            user_ids.append(str(user_id))
            tokens.append(
                create_access_token(
                    user_id=user_id,
                    session_id=session_id,
                    role="user",
                    secret=JWT_SECRET,
                    ttl=timedelta(hours=2),
                )
            )
    await eng.dispose()
    return {"tool_id": str(tool_id), "user_ids": user_ids, "tokens": tokens}


async def _ledger(db_url: str) -> dict[str, int]:
    """Totals over every bench caller: logs by outcome, charged tokens, what is still held."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(db_url)
    async with eng.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM usage_logs WHERE status = 'success') AS ok,"
                    " (SELECT count(*) FROM usage_logs WHERE status <> 'success') AS other,"
                    " (SELECT COALESCE(sum(tokens_used), 0) FROM usage_logs) AS log_tokens,"
                    " sum(s.tokens_used) AS tokens_used, sum(s.tokens_reserved) AS tokens_reserved,"
                    " sum(s.inflight) AS inflight FROM subscriptions s"
                ),
            )
        ).one()
    await eng.dispose()
    return {k: int(v) for k, v in row._mapping.items()}


# ------------------------------------------------------------------------------ main


async def _configure_limits(db_url: str, limits: str, tool_id: str) -> None:
    """Limits the run never reaches, so their cost is measured without refusals."""
    if limits == "none":
        return
    await _db_sql(
        db_url,
        "UPDATE plans SET requests_per_minute = 100000000, max_concurrent = 100000 WHERE code = 'enterprise'",
    )
    if limits == "plan+tool":
        await _db_sql(db_url, f"UPDATE tools SET requests_per_minute = 100000000 WHERE id = '{tool_id}'")


# The partitioned (empty) usage_logs swapped for a plain table with the same columns, keys and
# indexes. The hub's sweep then fails to add monthly partitions (it logs that and goes on).
_UNPARTITION = [
    "ALTER TABLE usage_logs RENAME TO usage_logs_parted",
    "CREATE TABLE usage_logs (LIKE usage_logs_parted INCLUDING ALL)",
    "DROP TABLE usage_logs_parted",
    "ALTER TABLE usage_logs ADD FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE",
    "ALTER TABLE usage_logs ADD FOREIGN KEY (tool_id) REFERENCES tools (id)",
    "ALTER TABLE usage_logs ADD FOREIGN KEY (subscription_id) REFERENCES subscriptions (id)"
    " ON DELETE SET NULL",
]


def _other_accounts_sql(n: int) -> list[str]:
    """`n` other accounts — users with a session, an API key and a subscription, and their calls of
    this period (4 of 5 tokens each, charged, so the exact-count check still adds up) — then fresh
    statistics: the database of a hub in service, which the measured callers share with everyone
    else."""
    return [
        f"""INSERT INTO users (id, name, email, password_hash, role, is_active, created_at, updated_at)
            SELECT gen_random_uuid(), 'Other', 'other-' || g || '@example.com', 'x', 'user', true,
                   now(), now()
            FROM generate_series(1, {n}) AS g""",
        """INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used, tokens_reserved, inflight,
                                      current_period_start, current_period_end, cancel_at_period_end,
                                      created_at, updated_at)
            SELECT gen_random_uuid(), id, 'pro', 'active', 20, 0, 0, now() - interval '1 day',
                   now() + interval '29 days', false, now(), now()
            FROM users WHERE name = 'Other'""",
        "INSERT INTO auth_sessions (id, user_id, created_at) SELECT gen_random_uuid(), id, now() FROM users"
        " WHERE name = 'Other'",
        """INSERT INTO api_keys (id, user_id, name, key_prefix, key_hash, is_active, created_at)
            SELECT gen_random_uuid(), id, 'k', 'jfui_other', sha256(CAST(id AS text)::bytea), true, now()
            FROM users WHERE name = 'Other'""",
        """INSERT INTO usage_logs (id, user_id, tool_id, subscription_id, plan_code, status, started_at,
                                   "timestamp", tokens_used, tokens_reserved, token_source)
            SELECT gen_random_uuid(), s.user_id, t.id, s.id, 'pro', 'success', now() - interval '1 hour',
                   now() - interval '1 hour', 5, 0, 'reported'
            FROM subscriptions AS s JOIN users AS u ON u.id = s.user_id AND u.name = 'Other'
            CROSS JOIN (SELECT id FROM tools LIMIT 1) AS t CROSS JOIN generate_series(1, 4)""",
        "ANALYZE",
    ]


async def _unpartition(db_url: str) -> None:
    for sql in _UNPARTITION:
        await _db_sql(db_url, sql)


async def _db_sql(db_url: str, sql: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(db_url)
    async with eng.begin() as conn:
        await conn.execute(text(sql))
    await eng.dispose()


def _measure_refusals(
    tool: str, url: str, headers: list[dict[str, str]], c: int, duration: float, db_url: str
) -> dict[str, float]:
    """429 RATE_LIMITED at c: every caller's plan allows one call a minute, already used."""
    asyncio.run(_db_sql(db_url, "UPDATE plans SET requests_per_minute = 1 WHERE code = 'enterprise'"))
    try:
        measure(tool, url, headers, BODY, c, 1)  # each caller's one call, then refusals
        return measure(tool, url, headers, BODY, c, duration)
    finally:
        asyncio.run(_db_sql(db_url, "UPDATE plans SET requests_per_minute = NULL WHERE code = 'enterprise'"))


def _line(label: str, m: dict[str, float]) -> str:
    return (
        f"{label}: {m['rps']:.0f} req/s  p50 {m['p50_ms']:.2f} ms  p99 {m['p99_ms']:.2f} ms  "
        f"errors {int(m['errors'])}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to run")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per timed run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--users", type=int, default=32, help="callers spread over the connections")
    parser.add_argument("--exact-calls", type=int, default=3000, help="calls of the exact-count check")
    parser.add_argument("--loadgen", default="auto", help="wrk | python | auto (wrk when installed)")
    parser.add_argument("--redis-url", default=None, help="run the hub with REDIS_URL (shared breakers)")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="ALTER DATABASE ... SET synchronous_commit = off for the bench database (see README)",
    )
    parser.add_argument(
        "--limits",
        default="none",
        choices=["none", "plan", "plan+tool"],
        help="configure rate/concurrency limits that the run never reaches (API.md §4.1): on the "
        "plan, or on the plan and the tool (a tool limit is one row every caller's admission locks)",
    )
    parser.add_argument(
        "--unpartitioned",
        action="store_true",
        help="turn usage_logs into a plain table before measuring: the same code on an unpartitioned "
        "table, for the cost of partitioning (issue 18) in one run",
    )
    parser.add_argument(
        "--other-accounts",
        type=int,
        default=0,
        help="seed this many other accounts (with sessions, keys and calls) before measuring: the "
        "statements must cost the same among many accounts as among a few",
    )
    parser.add_argument(
        "--extra-one-caller-c", type=int, default=0, help="also run one caller at this concurrency (e.g. 256)"
    )
    parser.add_argument(
        "--refusals",
        action="store_true",
        help="also measure 429 RATE_LIMITED answers at c (a plan limit of 1)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--serve-mock", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loadgen-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_mock is not None:
        _run(_serve_mock(args.serve_mock))
        return 0
    if args.loadgen_spec is not None:  # the load generator's own process
        spec = json.loads(args.loadgen_spec)
        res = _run(
            _load(spec["url"], spec["headers"], spec["body"].encode(), spec["c"], spec["s"], spec["n"])
        )
        # through a buffered writer: with PYTHONUNBUFFERED set, a print of this size to a pipe can
        # be cut at a 64 KiB boundary (a raw write that writes less than it was given)
        with open(sys.stdout.fileno(), "wb", closefd=False) as out:
            out.write(json.dumps(asdict(res)).encode() + b"\n")
        return 0
    tool = args.loadgen
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    print(f"load generator: {tool}" + ("" if tool == "wrk" else "  (install wrk: apt-get install -y wrk)"))

    mock_port = free_port()
    mock = subprocess.Popen(
        [sys.executable, __file__, "--serve-mock", str(mock_port)], start_new_session=True
    )
    upstream_url = f"http://127.0.0.1:{mock_port}/v1/run"
    db_name = f"joyhub_bench_{uuid.uuid4().hex[:8]}"
    from sqlalchemy.engine import make_url

    db_url = make_url(args.pg_url).set(database=db_name).render_as_string(hide_password=False)
    results: dict[str, Any] = {
        "load_generator": tool,
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "users": args.users,
        "concurrency": args.concurrency,
        "loadavg_at_start": os.getloadavg(),
        "synchronous_commit": "off" if args.async_commit else "on",
        "usage_logs": "plain table" if args.unpartitioned else "partitioned",
        "other_accounts": args.other_accounts,
    }
    hub: subprocess.Popen[bytes] | None = None
    seeded: dict[str, Any] | None = None
    c = args.concurrency
    try:  # from here on, the mock and the database are cleaned up whatever fails
        asyncio.run(_admin_sql(args.pg_url, f'CREATE DATABASE "{db_name}"'))
        if args.async_commit:
            asyncio.run(_admin_sql(args.pg_url, f'ALTER DATABASE "{db_name}" SET synchronous_commit = off'))
        time.sleep(0.5)
        jheaders = [{"Content-Type": "application/json"}]
        measure(tool, upstream_url, jheaders, UPSTREAM_BODY, 1, 2)  # warm-up
        direct = measure(tool, upstream_url, jheaders, UPSTREAM_BODY, 1, args.duration)
        results["direct_c1"] = direct
        print(_line("direct upstream c=1", direct))
        for workers in [int(w) for w in args.workers.split(",")]:
            port = free_port()
            hub = start_hub(db_url, workers, port, args.redis_url)
            if seeded is None:
                seeded = asyncio.run(_seed(db_url, upstream_url, args.users))
                asyncio.run(_configure_limits(db_url, args.limits, seeded["tool_id"]))
                if args.unpartitioned:
                    asyncio.run(_unpartition(db_url))
                for sql in _other_accounts_sql(args.other_accounts) if args.other_accounts else []:
                    asyncio.run(_db_sql(db_url, sql))
            url = f"http://127.0.0.1:{port}/api/v1/tools/{seeded['tool_id']}/invoke"
            every = [
                {"Content-Type": "application/json", "Authorization": f"Bearer {t}"} for t in seeded["tokens"]
            ]
            one = every[:1]
            measure(tool, url, every, BODY, c, 3)  # warm-up: pools, caches, prepared statements
            c1 = measure(tool, url, one, BODY, 1, args.duration)
            many = measure(tool, url, every, BODY, c, args.duration)
            single = measure(tool, url, one, BODY, c, args.duration)
            overhead = {"p50_ms": c1["p50_ms"] - direct["p50_ms"], "p99_ms": c1["p99_ms"] - direct["p99_ms"]}
            time.sleep(1.0)  # calls wrk left in flight at its deadline still finish and settle
            before = asyncio.run(_ledger(db_url))
            cpu0 = group_cpu_seconds(hub.pid)
            exact = python_load(url, every, BODY, c, 3600, args.exact_calls)
            cpu_ms = (group_cpu_seconds(hub.pid) - cpu0) * 1000 / max(1, exact.requests)
            after = asyncio.run(_ledger(db_url))
            check = {
                "calls": exact.requests,
                "http_200": exact.ok,
                "new_success_logs": after["ok"] - before["ok"],
                "non_success_logs": after["other"],
                "tokens_used_equals_sum_of_logs": after["tokens_used"] == after["log_tokens"],
                "reserved_after": after["tokens_reserved"],
                "inflight_after": after["inflight"],
            }
            check["exact"] = (
                check["http_200"] == check["calls"] == check["new_success_logs"]
                and check["non_success_logs"] == 0
                and check["tokens_used_equals_sum_of_logs"]
                and check["reserved_after"] == 0
                and check["inflight_after"] == 0
            )
            results[f"hub_{workers}w"] = {
                "c1": c1,
                f"c{c}_{args.users}_users": many,
                f"c{c}_1_user": single,
                "overhead_c1": overhead,
                "accounting": check,
                "hub_cpu_ms_per_invocation": cpu_ms,
                "one_caller_vs_many": single["rps"] / many["rps"] if many["rps"] else 0.0,
            }
            if args.extra_one_caller_c:
                big = measure(tool, url, one, BODY, args.extra_one_caller_c, args.duration)
                results[f"hub_{workers}w"][f"c{args.extra_one_caller_c}_1_user"] = big
                print(_line(f"hub {workers}w c={args.extra_one_caller_c} 1 user", big))
            if args.refusals:
                refused = _measure_refusals(tool, url, every, c, args.duration, db_url)
                results[f"hub_{workers}w"][f"c{c}_refusals"] = refused
                print(_line(f"hub {workers}w c={c} 429 refusals", refused))
            print(_line(f"hub {workers}w c=1", c1))
            print(
                f"hub {workers}w gateway overhead c=1: p50 {overhead['p50_ms']:.2f} ms  "
                f"p99 {overhead['p99_ms']:.2f} ms"
            )
            print(_line(f"hub {workers}w c={c} {args.users} users", many))
            print(_line(f"hub {workers}w c={c} 1 user", single))
            ratio = single["rps"] / many["rps"] if many["rps"] else 0.0
            print(f"hub {workers}w one caller / {args.users} callers at c={c}: {ratio:.2f}")
            print(f"hub {workers}w hub CPU per invocation: {cpu_ms:.2f} ms")
            print(f"hub {workers}w accounting: {check}")
            stop(hub)
            hub = None
    finally:
        if hub is not None:
            stop(hub)
        os.killpg(mock.pid, signal.SIGTERM)
        mock.wait()
        asyncio.run(_admin_sql(args.pg_url, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = all(v["accounting"]["exact"] for k, v in results.items() if k.startswith("hub_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared plumbing of the load scenarios in bench/load (see bench/README.md, "Load and operations").

Everything runs on 127.0.0.1: a fresh database on the PostgreSQL server given by --pg-url (the
system server by default), `joyhub serve` as a subprocess on it, a fast mock upstream in a process
of its own, callers seeded straight into the database, and a worker-RSS sampler. The scenario
scripts (mixed.py, login_burst.py, pg_restart.py, startup.py) compose these pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
HERE = Path(__file__).resolve().parent
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
JWT_SECRET = "load-bench-secret-key-that-is-long-enough-0123456789"
PASSWORD = "Load-Bench-Password-42"
UNLIMITED = 10**15

sys.path.insert(0, str(ROOT / "src"))


def asyncpg_dsn(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def wait_quiet(max_load: float, timeout: float = 600.0) -> float:
    """Wait (bounded) until the 1-minute load average is under `max_load`: figures taken while
    another job hogs this small machine would say nothing about the hub."""
    deadline = time.time() + timeout
    while True:
        load = os.getloadavg()[0]
        if load <= max_load or time.time() > deadline:
            return load
        print(f"  waiting for a quiet machine (load {load:.2f} > {max_load})", flush=True)
        time.sleep(15)


# ------------------------------------------------------------------------------- database


async def _admin(pg_url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def admin(pg_url: str, *statements: str) -> None:
    """Statements on the server of `pg_url` outside a transaction (CREATE/ALTER/DROP DATABASE)."""
    asyncio.run(_admin(pg_url, *statements))


@contextlib.contextmanager
def fresh_database(pg_url: str, keep: bool = False) -> Iterator[str]:
    """A new, migrated database on the server of `pg_url`; dropped afterwards unless `keep`."""
    from sqlalchemy.engine import make_url

    from joyhub.core.migrations import migrate

    name = f"joyhub_load_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(pg_url, f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url, "head")
        yield url
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            asyncio.run(_admin(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Seeded:
    tool_id: str
    user_ids: list[str]
    emails: list[str]
    tokens: list[str]


async def seed(
    db_url: str, *, users: int, upstream_url: str | None, bcrypt_rounds: int = 4, plan: str = "enterprise"
) -> Seeded:
    """`users` callers (user, live session, active subscription on `plan` with its limit raised
    so no run reaches it — "generous quotas") and one tool pointing at `upstream_url`.

    Every user has the password PASSWORD hashed at `bcrypt_rounds` (one hash, shared: the
    verification cost is what matters for a login benchmark)."""
    import asyncpg

    from joyhub.core.security import create_access_token, hash_password_sync

    password_hash = hash_password_sync(PASSWORD, bcrypt_rounds)
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    tool_id = uuid.uuid4()
    rows_users, rows_sessions, rows_subs = [], [], []
    seeded = Seeded(str(tool_id), [], [], [])
    tag = uuid.uuid4().hex[:6]
    for n in range(users):
        user_id, session_id = uuid.uuid4(), uuid.uuid4()
        email = f"load-{n}-{tag}@example.com"
        rows_users.append((user_id, "Load", email, password_hash))
        rows_sessions.append((session_id, user_id))
        rows_subs.append((uuid.uuid4(), user_id, plan))
        seeded.user_ids.append(str(user_id))
        seeded.emails.append(email)
        seeded.tokens.append(
            create_access_token(
                user_id=user_id, session_id=session_id, role="user", secret=JWT_SECRET, ttl=timedelta(hours=6)
            )
        )
    try:
        async with conn.transaction():
            await conn.execute("UPDATE plans SET token_limit = $1 WHERE code = $2", UNLIMITED, plan)
            if upstream_url:
                await conn.execute(
                    "INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts,"
                    " is_active, created_at, updated_at) VALUES ($1, $2, 'load benchmark mock', $3, 30, 3,"
                    " true, now(), now())",
                    tool_id,
                    f"load-echo-{tag}",
                    upstream_url,
                )
            await conn.executemany(
                "INSERT INTO users (id, name, email, password_hash, role, is_active, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, 'user', true, now(), now())",
                rows_users,
            )
            await conn.executemany(
                "INSERT INTO auth_sessions (id, user_id, created_at) VALUES ($1, $2, now())", rows_sessions
            )
            await conn.executemany(
                "INSERT INTO subscriptions (id, user_id, plan_code, status, tokens_used, tokens_reserved,"
                " inflight, current_period_start, current_period_end, cancel_at_period_end, created_at,"
                " updated_at) VALUES ($1, $2, $3, 'active', 0, 0, 0, now(), now() + interval '30 days',"
                " false, now(), now())",
                rows_subs,
            )
    finally:
        await conn.close()
    return seeded


async def ledger(db_url: str) -> dict[str, int]:
    """Accounting totals over the whole database (only the bench's callers live there)."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM usage_logs WHERE status = 'success') AS success,"
            " (SELECT count(*) FROM usage_logs WHERE status = 'pending') AS pending,"
            " (SELECT count(*) FROM usage_logs WHERE status NOT IN ('success', 'pending')) AS failed,"
            " (SELECT count(DISTINCT id) FROM usage_logs) AS distinct_ids,"
            " (SELECT count(*) FROM usage_logs) AS logs,"
            " (SELECT COALESCE(sum(tokens_used), 0) FROM usage_logs) AS log_tokens,"
            " (SELECT COALESCE(sum(tokens_used), 0) FROM subscriptions) AS tokens_used,"
            " (SELECT COALESCE(sum(tokens_reserved), 0) FROM subscriptions) AS tokens_reserved,"
            " (SELECT COALESCE(sum(inflight), 0) FROM subscriptions) AS inflight"
        )
    finally:
        await conn.close()
    return {k: int(v) for k, v in dict(row).items()}


def ledger_now(db_url: str) -> dict[str, int]:
    return asyncio.run(ledger(db_url))


# --------------------------------------------------------------------------- mock upstream


MOCK_RESPONSE = b'{"result":"ok","usage":{"total_tokens":5}}'
TOKENS_PER_CALL = 5


async def _mock_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(MOCK_RESPONSE)).encode()
        + b"\r\n\r\n"
        + MOCK_RESPONSE
    )
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            writer.write(answer)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve_mock(port: int) -> None:
    server = await asyncio.start_server(_mock_conn, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@contextlib.contextmanager
def mock_upstream() -> Iterator[str]:
    """A fast upstream (its own process) answering every POST with 5 tokens; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "harness.py"), "--serve-mock", str(port)], start_new_session=True
    )
    try:
        deadline = time.time() + 10
        while not port_open(port):
            if time.time() > deadline:
                raise RuntimeError("mock upstream did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/run"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


# ------------------------------------------------------------------------------------ hub


@dataclass
class Hub:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float  # time.monotonic() at the start
    wall_started: float = 0.0  # time.time() at the start (to compare with log timestamps)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[Any]:
        """The uvicorn worker processes (or the single process when serving with one worker)."""
        import psutil

        parent = psutil.Process(self.proc.pid)
        kids = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        return kids or [parent]

    def cpu_seconds(self) -> float:
        """User+system CPU time of every worker so far (the hub's own cost, whatever else runs)."""
        import psutil

        total = 0.0
        for p in self.workers():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def group_cpu_seconds(self) -> float:
        """User+system CPU of every process of the hub's group, read from /proc: the workers and
        uvicorn's supervisor (`start_hub` makes the hub a session leader, so its pid is the
        group's id). Unlike `cpu_seconds`, no psutil and nothing missed between samples."""
        return process_group_cpu_seconds(self.proc.pid)

    def cleanup(self) -> None:
        """Remove the hub's data directory (its log, metrics files): after a clean exit only."""
        import shutil

        shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def process_group_cpu_seconds(pgid: int) -> float:
    """User+system CPU seconds of every live process in process group `pgid`, from /proc."""
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
        if int(fields[2]) == pgid:  # pgrp, the 5th field (the 3rd after the command name)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def hub_env(db_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ADMIN_", "PROMETHEUS_"))}
    env.update(
        DATABASE_URL=db_url,
        JWT_SECRET_KEY=JWT_SECRET,
        LOG_LEVEL="WARNING",
        DATA_DIR=str(data_dir),
        ENVIRONMENT="development",
    )
    env.update(extra)
    return env


def start_hub(
    db_url: str, *, workers: int = 2, port: int | None = None, env: dict[str, str] | None = None
) -> Hub:
    port = port or free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="joyhub-load-"))
    log_path = data_dir / "hub.log"
    mono, wall = time.monotonic(), time.time()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "joyhub"), "serve", "--port", str(port), "--workers", str(workers)],
            env=hub_env(db_url, data_dir, **(env or {})),
            cwd=data_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Hub(proc, port, log_path, mono, wall)


def wait_ready(hub: Hub, timeout: float = 60.0, path: str = "/ready") -> float:
    """Seconds from the start of `joyhub serve` to the first 200 on `path`."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as c:
        while time.monotonic() < deadline:
            if hub.proc.poll() is not None:
                raise RuntimeError(f"hub exited during start-up:\n{hub.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if c.get(hub.base + path).status_code == 200:
                    return time.monotonic() - hub.started_at
            time.sleep(0.02)
    raise RuntimeError(f"hub not ready in {timeout} s:\n{hub.log_tail()}")


def stop_hub(hub: Hub, timeout: float = 40.0) -> int:
    """SIGTERM, wait for a clean exit (SIGKILL the group if it does not come)."""
    if hub.proc.poll() is None:
        hub.proc.send_signal(signal.SIGTERM)
        try:
            hub.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(hub.proc.pid, signal.SIGKILL)
            hub.proc.wait()
    return hub.proc.returncode


@contextlib.contextmanager
def running_hub(db_url: str, **kw: Any) -> Iterator[Hub]:
    hub = start_hub(db_url, **kw)
    try:
        wait_ready(hub)
        yield hub
    finally:
        code = stop_hub(hub)
        if code != 0:
            print(f"hub exit status {code}; its log: {hub.log_path}\n{hub.log_tail()}")
        else:
            hub.cleanup()


# ------------------------------------------------------------------------------ RSS sampler


@dataclass
class RssSampler:
    """Samples every hub worker's RSS (MiB) every `every` seconds in a thread."""

    hub: Hub
    every: float = 15.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def sample(self) -> dict[str, Any]:
        import psutil

        row: dict[str, Any] = {"t": round(time.monotonic() - self._t0, 1), "load1": os.getloadavg()[0]}
        for p in self.hub.workers():
            with contextlib.suppress(psutil.Error):
                row[str(p.pid)] = round(p.memory_info().rss / 2**20, 1)
        self.samples.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def dump(path: str | None, results: dict[str, Any]) -> None:
    text = json.dumps(results, indent=2, default=str)
    if path:
        Path(path).write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-mock":
        run_loop(_serve_mock(int(sys.argv[2])))

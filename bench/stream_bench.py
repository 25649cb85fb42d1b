"""Streaming benchmark (issue 13, API.md §5.1): what relaying Server-Sent Events costs the hub,
with full accounting on.

End to end (see bench/README.md, "Streaming"):

1. a mock SSE upstream in its own process (`bench/load/sse_upstream.py`: raw asyncio + uvloop;
   chunk count and interval per request from the URL query, `usage.total_tokens` in the last
   event, then `data: [DONE]`);
2. a fresh database on the PostgreSQL server of --pg-url (the system server by default), the
   hub as `joyhub serve --workers N` on it, callers (user, session, enterprise subscription
   with the limit out of reach) and one tool per answer shape seeded straight into it;
3. the SSE load generator (`bench/load/sse_loadgen.py`) in its own process, reading and
   counting every event; the hub's CPU from /proc (all its processes);
4. three parts (--parts):
   1. time to first chunk, c=1, sequential: through the hub minus direct to the mock (target
      p50 ≤ 3 ms), in blocks interleaved with the same tool not streamed and with a plain JSON
      tool direct and through the hub (the non-streaming overhead in the same minutes);
   2. hub CPU per relayed chunk: --chunk-streams streams of --chunks chunks that the upstream
      sends as fast as it can, --chunk-concurrency at a time; hub CPU seconds ÷ chunks relayed
      (target ≤ 30 µs) and the wall-clock chunks/s; the fixed cost of a stream, measured on
      1-chunk streams, to split the figure; then the same for chunks that trickle in
      (--paced-streams at once, a chunk every --paced-interval s);
   3. --streams concurrent streams (1,000), one chunk every --interval s (1) for --duration s
      (30), on --workers workers (2), opened over --ramp s (0: at once): 0 errors, every chunk
      delivered and how late, worker RSS peak (target < 200 MB), connections per worker and
      the accept queue every second, and `GET /api/v1/users/me` latency (target p99 < 100 ms)
      from a separate client at --probe-rate requests/s, also by phase (opening, steady,
      closing);
5. after each part the accounting check: the ledger is consistent (Σ usage logs = the
   subscriptions' tokens_used = every rollup; the `done` events = the new success logs, their
   tokens too; nothing pending, reserved or in flight) and every stream was delivered whole
   (ended with `done`, with exactly the chunks the mock sent). The exit status is 1 when
   either fails (with --strict, also when a target is missed).

Run:  .venv/bin/python bench/stream_bench.py [--parts 1,2,3] [--duration 30] [--streams 1000]
          [--workers 2] [--json out.json] [--pg-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres]
          [--async-commit] [--ramp 0] [--hub-env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import http.client
import math
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "load"))
from harness import (  # noqa: E402
    DEFAULT_PG,
    Hub,
    RssSampler,
    admin,
    asyncpg_dsn,
    dump,
    fresh_database,
    ledger,
    machine,
    running_hub,
    seed,
    wait_quiet,
)
from sse_loadgen import Report, Spec, run_streams  # noqa: E402
from sse_upstream import TOKENS_PER_CHUNK, sse_upstream  # noqa: E402

UPSTREAM_BODY = '{"prompt":"Tell me a story about a benchmark"}'  # what the hub sends upstream
TTFC_CHUNKS = 5  # part 1's streams: short, so that the first chunk is what is measured

TARGETS = {
    "ttfc_overhead_p50_ms": 3.0,
    "hub_cpu_us_per_chunk": 30.0,
    "worker_rss_peak_mb": 200.0,
    "users_me_p99_ms": 100.0,
}


def pct(data: list[float], p: float) -> float:
    if not data:
        return float("nan")
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def spread(data: list[float]) -> dict[str, float]:
    """p50 / p99 / max, rounded for the report."""
    return {
        "n": len(data),
        "p50": round(pct(data, 50), 3),
        "p99": round(pct(data, 99), 3),
        "max": round(max(data), 3) if data else float("nan"),
    }


# ------------------------------------------------------------------------------ the setup


@dataclass(frozen=True)
class Shape:
    """One tool: the mock's answer shape is in its endpoint's query. A streaming tool, or with
    `plain` a non-streaming one answering JSON that reports as many tokens (for comparison)."""

    chunks: int
    interval: float
    plain: bool = False

    def query(self) -> str:
        return f"?chunks={self.chunks}&interval={self.interval:g}" + ("&plain=1" if self.plain else "")

    @property
    def tokens(self) -> int:
        return self.chunks * TOKENS_PER_CHUNK

    @property
    def chunks_seen(self) -> int:
        """Chunks a caller receives: none from a plain tool (its answer is one JSON)."""
        return 0 if self.plain else self.chunks


@dataclass
class World:
    """What the parts need: the hub, the mock's URL, the callers' headers, a tool per shape."""

    hub: Hub
    db_url: str
    upstream: str
    callers: list[dict[str, str]]  # one Authorization header set per caller
    probe: dict[str, str]  # the /users/me client's, a caller that does not stream
    tools: dict[Shape, str] = field(default_factory=dict)

    def invoke_url(self, shape: Shape) -> str:
        return f"{self.hub.base}/api/v1/tools/{self.tools[shape]}/invoke"

    def direct_url(self, shape: Shape) -> str:
        return self.upstream + shape.query()


async def add_tools(db_url: str, upstream: str, shapes: list[Shape]) -> dict[Shape, str]:
    """One tool per shape, pointing at the mock with that shape's query."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    tools: dict[Shape, str] = {}
    try:
        for shape in shapes:
            tool_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO tools (id, name, description, api_endpoint, timeout_seconds, max_attempts,"
                " is_active, streaming, created_at, updated_at) VALUES ($1, $2, 'stream benchmark mock',"
                " $3, 30, 3, true, $4, now(), now())",
                tool_id,
                f"{'plain' if shape.plain else 'stream'}-{shape.chunks}x{shape.interval:g}-{tool_id.hex[:6]}",
                upstream + shape.query(),
                not shape.plain,
            )
            tools[shape] = str(tool_id)
    finally:
        await conn.close()
    return tools


async def rollup_totals(db_url: str) -> dict[str, int]:
    """The rollups' sums, to hold against the raw logs."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT COALESCE(sum(invocations), 0) FROM usage_daily) AS daily_invocations,"
            " (SELECT COALESCE(sum(tokens), 0) FROM usage_daily) AS daily_tokens,"
            " (SELECT COALESCE(sum(tokens), 0) FROM usage_hourly) AS hourly_tokens,"
            " (SELECT COALESCE(sum(tokens), 0) FROM usage_user_daily) AS user_daily_tokens,"
            " (SELECT COALESCE(sum(tokens), 0) FROM usage_user_weekly) AS user_weekly_tokens,"
            " (SELECT COALESCE(sum(tokens), 0) FROM usage_platform_daily) AS platform_daily_tokens,"
            " (SELECT COALESCE(sum(invocations), 0) FROM usage_platform_daily) AS platform_invocations"
        )
    finally:
        await conn.close()
    return {k: int(v) for k, v in dict(row).items()}


def totals(db_url: str) -> dict[str, int]:
    async def both() -> dict[str, int]:
        return {**await ledger(db_url), **await rollup_totals(db_url)}

    return asyncio.run(both())


def settled(db_url: str, timeout: float = 30.0) -> dict[str, int]:
    """The totals once nothing is pending (streams the client gave up on may still be settling:
    bounded wait, polling the database, not a sleep in place of a condition)."""
    deadline = time.monotonic() + timeout
    while True:
        now = totals(db_url)
        if now["pending"] == 0 or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def accounting(
    before: dict[str, int], after: dict[str, int], runs: list[tuple[Report, Shape]]
) -> dict[str, Any]:
    """The exact check of one part (the module's docstring, step 5). `runs` are every run of the
    part against the hub, each with the shape of the tool it called.

    Two halves, both required: the ledger is consistent (whatever happened, Σ usage logs = the
    subscriptions' counters = every rollup, the `done` events' tokens = the new success logs',
    nothing pending, reserved or in flight), and every stream was delivered whole (every request
    ended with `done`, with exactly the chunks the mock sent, and is one new success log)."""
    streams = sum(r.streams for r, _ in runs)
    histogram: Counter[str] = Counter()
    expected_histogram: Counter[str] = Counter()
    for r, shape in runs:
        histogram.update(r.chunks_per_stream)
        expected_histogram[str(shape.chunks_seen)] += r.streams
    done_tokens = sum(r.tokens_done for r, _ in runs)
    check: dict[str, Any] = {
        "streams": streams,
        "done_events": sum(r.completed for r, _ in runs),
        "new_success_logs": after["success"] - before["success"],
        "new_other_logs": after["failed"] - before["failed"],
        "done_tokens": done_tokens,
        "new_log_tokens": after["log_tokens"] - before["log_tokens"],
        "expected_tokens": sum(r.streams * shape.tokens for r, shape in runs),
        "chunks_per_stream": dict(histogram),
        "expected_chunks_per_stream": dict(expected_histogram),
        "pending": after["pending"],
        "tokens_reserved": after["tokens_reserved"],
        "inflight": after["inflight"],
        "log_tokens_total": after["log_tokens"],
        "subscription_tokens_used": after["tokens_used"],
        "rollup_tokens": {
            k: after[k]
            for k in (
                "daily_tokens",
                "hourly_tokens",
                "user_daily_tokens",
                "user_weekly_tokens",
                "platform_daily_tokens",
            )
        },
        "logs_total": after["logs"],
        "rollup_invocations": {k: after[k] for k in ("daily_invocations", "platform_invocations")},
    }
    check["ledger_consistent"] = (
        check["pending"] == check["tokens_reserved"] == check["inflight"] == 0
        and check["subscription_tokens_used"] == check["log_tokens_total"]
        and all(v == check["log_tokens_total"] for v in check["rollup_tokens"].values())
        and all(v == check["logs_total"] for v in check["rollup_invocations"].values())
        and check["done_events"] == check["new_success_logs"]
        and done_tokens == check["new_log_tokens"]
    )
    check["all_delivered"] = (
        check["done_events"] == streams
        and check["new_other_logs"] == 0
        and done_tokens == check["expected_tokens"]
        and histogram == expected_histogram
    )
    check["exact"] = check["ledger_consistent"] and check["all_delivered"]
    return check


def print_check(check: dict[str, Any]) -> None:
    verdict = "EXACT" if check["exact"] else "FAILED"
    print(
        f"  accounting {verdict} (ledger consistent: {check['ledger_consistent']}, every stream delivered"
        f" whole: {check['all_delivered']}): {check['streams']} streams, {check['done_events']} done,"
        f" {check['new_success_logs']} new success logs, {check['new_other_logs']} other;"
        f" tokens done {check['done_tokens']} = logs {check['new_log_tokens']}"
        f" (expected {check['expected_tokens']}); Σ logs {check['log_tokens_total']},"
        f" tokens_used {check['subscription_tokens_used']},"
        f" rollups {sorted(set(check['rollup_tokens'].values()))};"
        f" pending {check['pending']}, reserved {check['tokens_reserved']}, in flight {check['inflight']};"
        f" chunks per stream {check['chunks_per_stream']}",
        flush=True,
    )


# ------------------------------------------------------------------- part 1: first chunk


@dataclass(frozen=True)
class Series:
    """One kind of request of part 1: where it goes, what it sends, which tool's shape."""

    url: str
    body: str
    dialect: str
    shape: Shape
    via_hub: bool


def part_ttfc(world: World, requests: int, blocks: int) -> tuple[dict[str, Any], list[tuple[Report, Shape]]]:
    """c=1, sequential, one keep-alive connection per block; the kinds of request in alternating
    blocks, so that the machine's drift hits them alike:

    - `direct`: the mock's stream, straight; `stream`: the same through the hub (`stream: true`)
      -> the target, time to first chunk through the hub minus direct;
    - `collected`: the same streaming tool through the hub without `stream: true` (one JSON);
    - `direct_plain` / `plain`: a non-streaming tool answering JSON with the same tokens, straight
      and through the hub -> the gateway's non-streaming overhead in the same minutes, the
      yardstick for a machine whose speed varies (bench/gateway_bench.py measures it alone)."""
    streamed, plain = Shape(TTFC_CHUNKS, 0), Shape(TTFC_CHUNKS, 0, plain=True)

    def invoke(stream: bool) -> str:
        return '{"input":' + UPSTREAM_BODY + ',"stream":' + ("true" if stream else "false") + "}"

    series = {
        "direct": Series(world.direct_url(streamed), UPSTREAM_BODY, "direct", streamed, False),
        "stream": Series(world.invoke_url(streamed), invoke(True), "hub", streamed, True),
        "collected": Series(world.invoke_url(streamed), invoke(False), "hub", streamed, True),
        "direct_plain": Series(world.direct_url(plain), UPSTREAM_BODY, "direct", plain, False),
        "plain": Series(world.invoke_url(plain), invoke(False), "hub", plain, True),
    }
    hub_runs: list[tuple[Report, Shape]] = []
    ttfc: dict[str, list[float]] = {name: [] for name in series}
    total: dict[str, list[float]] = {name: [] for name in series}
    cpu: dict[str, float] = dict.fromkeys(series, 0.0)
    errors: Counter[str] = Counter()

    def block(name: str, n: int, keep: bool = True) -> None:
        one = series[name]
        headers = world.callers[:1] if one.via_hub else [{}]
        cpu0 = world.hub.group_cpu_seconds()
        report = run_streams(Spec(one.url, headers, one.body, one.dialect, per_connection=n))
        if one.via_hub:
            hub_runs.append((report, one.shape))
        errors.update(report.errors)
        if keep:
            cpu[name] += world.hub.group_cpu_seconds() - cpu0
            ttfc[name] += report.ttfc_ms
            total[name] += report.total_ms

    for name in series:  # warm-up: the pools, the caches, the prepared statements
        block(name, 50, keep=False)
    per_block = max(1, requests // blocks)
    for _ in range(blocks):
        for name in series:
            block(name, per_block)

    def p(name: str, q: float) -> float:
        return pct(ttfc[name], q)

    result: dict[str, Any] = {
        "requests_each": per_block * blocks,
        "overhead_p50_ms": round(p("stream", 50) - p("direct", 50), 3),
        "overhead_p99_ms": round(p("stream", 99) - p("direct", 99), 3),
        "plain_overhead_p50_ms": round(p("plain", 50) - p("direct_plain", 50), 3),
        "plain_overhead_p99_ms": round(p("plain", 99) - p("direct_plain", 99), 3),
        "ttfc_ms": {name: spread(ms) for name, ms in ttfc.items()},
        "stream_to_done_ms": spread(total["stream"]),
        "hub_cpu_ms_per_call": {
            name: round(cpu[name] / max(1, len(ttfc[name])) * 1000, 3)
            for name in series
            if series[name].via_hub
        },
        "errors": dict(errors),
    }
    print(
        f"part 1, time to first chunk, c=1, {result['requests_each']} requests of each kind:"
        f" direct p50 {p('direct', 50):.3f} / p99 {p('direct', 99):.3f} ms,"
        f" hub p50 {p('stream', 50):.3f} / p99 {p('stream', 99):.3f} ms"
        f" -> overhead p50 {result['overhead_p50_ms']} ms (target ≤ {TARGETS['ttfc_overhead_p50_ms']}),"
        f" p99 {result['overhead_p99_ms']} ms; stream to `done` p50 {pct(total['stream'], 50):.3f} ms;"
        f" not streamed p50 {p('collected', 50):.3f} ms; same run, a plain JSON tool: direct p50"
        f" {p('direct_plain', 50):.3f} ms, hub p50 {p('plain', 50):.3f} ms -> non-streaming overhead p50"
        f" {result['plain_overhead_p50_ms']} / p99 {result['plain_overhead_p99_ms']} ms;"
        f" hub CPU per call {result['hub_cpu_ms_per_call']} ms; errors {result['errors'] or 0}",
        flush=True,
    )
    return result, hub_runs


# ------------------------------------------------------------------- part 2: CPU per chunk


@dataclass(frozen=True)
class Paced:
    """Part 2's second measurement: streams whose chunks trickle in, one every `interval` s."""

    streams: int
    chunks: int
    interval: float


def part_cpu(
    world: World, chunks: int, streams: int, concurrency: int, paced: Paced
) -> tuple[dict[str, Any], list[tuple[Report, Shape]]]:
    """Streams of `chunks` chunks sent as fast as the mock can: hub CPU ÷ chunks relayed. The same
    with 1-chunk streams gives the fixed cost of a stream (admission, settle, HTTP), so the
    figure can be split into per stream and per chunk. Then the same split for chunks that
    trickle in (`paced`), as an AI tool's tokens do: each chunk wakes the relay on its own."""
    long, short = Shape(chunks, 0), Shape(1, 0)
    slow = Shape(paced.chunks, paced.interval)
    body = '{"input":' + UPSTREAM_BODY + ',"stream":true}'
    conns = min(concurrency, streams)

    def measured(shape: Shape, n: int, c: int) -> tuple[Report, float]:
        spec = Spec(
            world.invoke_url(shape),
            world.callers[:c],
            body,
            "hub",
            connections=c,
            per_connection=max(1, n // c),
            stream_timeout=120 + shape.chunks * shape.interval,
        )
        cpu0 = world.hub.group_cpu_seconds()
        report = run_streams(spec)
        return report, world.hub.group_cpu_seconds() - cpu0

    warm, _ = measured(long, conns, conns)  # warm-up
    short_report, short_cpu = measured(short, max(200, streams * 5), conns)
    report, cpu = measured(long, streams, conns)
    paced_report, paced_cpu = (
        measured(slow, paced.streams, paced.streams) if paced.streams else (Report(), 0.0)
    )
    per_stream_us = short_cpu / max(1, short_report.streams) * 1e6

    def per_chunk(r: Report, cpu_s: float) -> dict[str, Any]:
        return {
            "streams": r.streams,
            "chunks_relayed": r.chunks,
            "seconds": round(r.seconds, 3),
            "chunks_per_second": round(r.chunks / r.seconds) if r.seconds else 0,
            "hub_cpu_seconds": round(cpu_s, 3),
            "hub_cpu_us_per_chunk": round(cpu_s / max(1, r.chunks) * 1e6, 2),
            "hub_cpu_us_per_chunk_marginal": round(
                (cpu_s - per_stream_us / 1e6 * r.streams) / max(1, r.chunks) * 1e6, 2
            ),
            "loadgen_cpu_seconds": round(r.cpu_seconds, 3),
            "errors": r.errors,
        }

    result: dict[str, Any] = {
        "chunks_per_stream": chunks,
        "concurrency": conns,
        **per_chunk(report, cpu),
        "hub_cpu_us_per_stream_fixed": round(per_stream_us, 1),
        "stream_total_ms": spread(report.total_ms),
        "short_streams": {
            "streams": short_report.streams,
            "hub_cpu_seconds": round(short_cpu, 3),
            "streams_per_second": round(short_report.streams / short_report.seconds)
            if short_report.seconds
            else 0,
            "errors": short_report.errors,
        },
    }
    print(
        f"part 2, {report.streams} streams x {chunks} chunks at c={conns}: {report.chunks} chunks in"
        f" {report.seconds:.2f} s = {result['chunks_per_second']} chunks/s; hub CPU {cpu:.2f} s ="
        f" {result['hub_cpu_us_per_chunk']} µs per chunk (target ≤ {TARGETS['hub_cpu_us_per_chunk']}),"
        f" of which a stream's fixed cost {per_stream_us:.0f} µs (1-chunk streams) ->"
        f" {result['hub_cpu_us_per_chunk_marginal']} µs per chunk marginal;"
        f" load generator CPU {report.cpu_seconds:.2f} s; errors {report.errors or 0}",
        flush=True,
    )
    runs = [(warm, long), (short_report, short), (report, long)]
    if paced.streams:
        result["paced"] = {"chunks_per_stream": paced.chunks, "interval_s": paced.interval}
        result["paced"].update(per_chunk(paced_report, paced_cpu))
        p = result["paced"]
        print(
            f"part 2, paced: {paced_report.streams} streams at once x {paced.chunks} chunks every"
            f" {paced.interval:g} s: {p['chunks_per_second']} chunks/s; hub CPU {paced_cpu:.2f} s ="
            f" {p['hub_cpu_us_per_chunk']} µs per chunk, {p['hub_cpu_us_per_chunk_marginal']} µs marginal;"
            f" errors {paced_report.errors or 0}",
            flush=True,
        )
        runs.append((paced_report, slow))
    return result, runs


# ------------------------------------------------------- part 3: 1,000 concurrent streams


class Probe:
    """`GET /api/v1/users/me` at a fixed rate from its own thread, a new connection each time
    (so it lands on either worker, and waits in the accept queue like any new client), while the
    streams run: how a user of the dashboard fares meanwhile."""

    def __init__(self, port: int, headers: dict[str, str], rate: float) -> None:
        self.port, self.headers, self.period = port, headers, 1.0 / rate
        self.samples: list[tuple[float, float]] = []  # (unix time sent, ms) of each 200
        self.failures: list[tuple[float, str]] = []  # (unix time sent, what)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent, t0 = time.time(), time.perf_counter()
        try:
            conn.request("GET", "/api/v1/users/me", headers=self.headers)
            resp = conn.getresponse()
            resp.read()
            elapsed = (time.perf_counter() - t0) * 1000
            if resp.status == 200:
                self.samples.append((sent, elapsed))
            else:
                self.failures.append((sent, f"http {resp.status}"))
        except OSError as exc:
            self.failures.append((sent, type(exc).__name__))
        finally:
            conn.close()

    def _run(self) -> None:
        start = time.monotonic()
        k = 0
        while not self._stop.is_set():
            self._one()
            k += 1
            self._stop.wait(max(0.0, start + k * self.period - time.monotonic()))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def accept_queue(port: int) -> int:
    """Connections the kernel completed on the hub's listening socket that no worker has
    accepted yet (the LISTEN socket's rx_queue in /proc/net/tcp)."""
    suffix = f":{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[1].endswith(suffix) and cols[3] == "0A":  # 0A: LISTEN
                return int(cols[4].split(":")[1], 16)
    return 0


def connections_per_worker(hub: Hub, upstream_port: int) -> dict[str, dict[str, int]]:
    """Established TCP connections of each worker: callers' (on the hub's port) and upstream
    (to the mock): how the streams were spread over the workers."""
    import psutil

    out: dict[str, dict[str, int]] = {}
    for p in hub.workers():
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        established = [c for c in conns if c.status == psutil.CONN_ESTABLISHED]
        out[str(p.pid)] = {
            "callers": sum(1 for c in established if c.laddr and c.laddr.port == hub.port),
            "upstream": sum(1 for c in established if c.raddr and c.raddr.port == upstream_port),
        }
    return out


@dataclass
class ConnectionSampler:
    """Every `every` s, in a thread: the accept queue and each worker's connections."""

    hub: Hub
    upstream_port: int
    every: float = 1.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            self.samples.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "accept_queue": accept_queue(self.hub.port),
                    "workers": connections_per_worker(self.hub, self.upstream_port),
                }
            )
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> ConnectionSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peaks(self) -> dict[str, Any]:
        callers: dict[str, int] = {}
        upstream: dict[str, int] = {}
        for s in self.samples:
            for pid, c in s["workers"].items():
                callers[pid] = max(callers.get(pid, 0), c["callers"])
                upstream[pid] = max(upstream.get(pid, 0), c["upstream"])
        return {
            "accept_queue": max((s["accept_queue"] for s in self.samples), default=0),
            "callers_per_worker": callers,
            "upstream_per_worker": upstream,
        }


def timeline(report: Report) -> dict[str, dict[int, int]]:
    """Per second of the run: streams requested, streams whose first chunk arrived, streams ended."""

    def per_second(times: list[float]) -> dict[int, int]:
        return dict(sorted(Counter(int(t) for t in times).items()))

    return {
        "requested": per_second(report.requested_s),
        "first_chunk": per_second(report.first_chunk_s),
        "ended": per_second(report.ended_s),
    }


def probe_phases(probe: Probe, report: Report, share: float = 0.9) -> dict[str, Any]:
    """/users/me latency in each phase of the run: `opening` until `share` of the streams that
    relayed at all are relaying (first chunk in, not ended), `steady` while they are, `closing`
    from the first stream's end (the settles), and over the whole run. A few streams that wait
    long for their first chunk, or fail before it, do not make the whole run "opening"."""
    firsts = sorted(report.first_chunk_s)
    ends = sorted(report.ended_s)
    first_end = ends[0] if ends else math.inf

    def relaying(t: float) -> int:
        return bisect.bisect_right(firsts, t) - bisect.bisect_right(ends, t)

    phases: dict[str, list[float]] = {"opening": [], "steady": [], "closing": []}
    for sent, ms in probe.samples:
        t = sent - report.started_at
        if t >= first_end:
            phases["closing"].append(ms)
        elif relaying(t) >= share * len(firsts):
            phases["steady"].append(ms)
        else:
            phases["opening"].append(ms)
    out: dict[str, Any] = {name: spread(ms) for name, ms in phases.items()}
    out["whole_run"] = spread([ms for _, ms in probe.samples])
    out["failures"] = dict(Counter(what for _, what in probe.failures))
    out["failures_at_s"] = [round(sent - report.started_at, 1) for sent, _ in probe.failures]
    out["samples"] = [(round(sent - report.started_at, 2), round(ms, 2)) for sent, ms in probe.samples]
    return out


def part_concurrent(
    world: World, streams: int, duration: float, interval: float, ramp: float, probe_rate: float
) -> tuple[dict[str, Any], list[tuple[Report, Shape]]]:
    """`streams` streams at once, one connection each, a chunk every `interval` s for `duration`
    s, opened over `ramp` s (0: all at once); every chunk's delay, the workers' RSS and
    connections every second, and /users/me from a separate client meanwhile."""
    shape = Shape(max(1, round(duration / interval)), interval)
    body = '{"input":' + UPSTREAM_BODY + ',"stream":true}'
    spec = Spec(
        world.invoke_url(shape),
        world.callers[:streams],
        body,
        "hub",
        connections=streams,
        per_connection=1,
        ramp=ramp,
        delays=True,
        stream_timeout=duration + 120,
    )
    upstream_port = int(world.upstream.split(":")[2].split("/")[0])
    rss_idle = RssSampler(world.hub).sample()
    cpu0 = world.hub.group_cpu_seconds()
    load_before = os.getloadavg()
    with (
        RssSampler(world.hub, every=1.0) as rss,
        ConnectionSampler(world.hub, upstream_port) as conns,
        Probe(world.hub.port, world.probe, probe_rate) as probe,
    ):
        report = run_streams(spec)
    cpu = world.hub.group_cpu_seconds() - cpu0
    workers = [k for k in rss_idle if k not in ("t", "load1")]
    peaks = {pid: max(s.get(pid, 0.0) for s in rss.samples) for pid in workers}
    rss_idle_mb = {pid: rss_idle[pid] for pid in workers}
    probe_result = probe_phases(probe, report)
    conn_peaks = conns.peaks()
    ttfc, delay = spread(report.ttfc_ms), spread(report.delay_ms)
    result: dict[str, Any] = {
        "streams": report.streams,
        "chunks_per_stream": shape.chunks,
        "interval_s": interval,
        "ramp_s": ramp,
        "completed": report.completed,
        "errors": report.errors,
        "error_count": report.error_count,
        "max_open_streams": report.max_open,
        "chunks_relayed": report.chunks,
        "seconds": round(report.seconds, 2),
        "ttfc_ms": ttfc,
        "chunk_delay_ms": delay,
        "stream_total_s": spread([t / 1000 for t in report.total_ms]),
        "worker_rss_idle_mb": rss_idle_mb,
        "worker_rss_peak_mb": peaks,
        "connections_peak": conn_peaks,
        "users_me_ms": probe_result,
        "hub_cpu_seconds": round(cpu, 2),
        "loadgen_cpu_seconds": round(report.cpu_seconds, 2),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "timeline": timeline(report),
        "worker_rss_samples": rss.samples,
        "connection_samples": conns.samples,
    }
    me = probe_result["whole_run"]
    by_phase = ", ".join(
        f"{k} p99 {probe_result[k]['p99']} ms (n={probe_result[k]['n']})"
        for k in ("opening", "steady", "closing")
    )
    print(
        f"part 3, {report.streams} concurrent streams x {shape.chunks} chunks every {interval:g} s"
        f" (opened over {ramp:g} s): {report.completed} completed, errors {report.errors or 0};"
        f" first chunk p50 {pct(report.ttfc_ms, 50):.0f} / p99 {pct(report.ttfc_ms, 99):.0f}"
        f" / max {ttfc['max']:.0f} ms;"
        f" chunk delay p50 {pct(report.delay_ms, 50):.2f} / p99 {pct(report.delay_ms, 99):.2f}"
        f" / max {delay['max']:.1f} ms;"
        f" worker RSS idle {rss_idle_mb} -> peak {peaks} MiB"
        f" (target < {TARGETS['worker_rss_peak_mb']} MB);"
        f" /users/me p50 {me['p50']:.1f} / p99 {me['p99']:.1f} / max {me['max']:.1f} ms over {me['n']}"
        f" (target p99 < {TARGETS['users_me_p99_ms']}), by phase {by_phase};"
        f" failures {probe_result['failures'] or 0};"
        f" peak connections {conn_peaks};"
        f" hub CPU {cpu:.1f} s, load generator CPU {report.cpu_seconds:.1f} s",
        flush=True,
    )
    return result, [(report, shape)]


# --------------------------------------------------------------------------------- main


def targets_met(results: dict[str, Any]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    if "ttfc" in results:
        met["ttfc_overhead_p50"] = results["ttfc"]["overhead_p50_ms"] <= TARGETS["ttfc_overhead_p50_ms"]
    if "cpu_per_chunk" in results:
        met["hub_cpu_per_chunk"] = (
            results["cpu_per_chunk"]["hub_cpu_us_per_chunk"] <= TARGETS["hub_cpu_us_per_chunk"]
        )
    if "concurrent" in results:
        c = results["concurrent"]
        peak = max(c["worker_rss_peak_mb"].values(), default=math.inf)
        met["concurrent_0_errors"] = c["error_count"] == 0 and not c["users_me_ms"]["failures"]
        met["worker_rss_peak"] = peak * 2**20 < TARGETS["worker_rss_peak_mb"] * 1e6
        met["users_me_p99"] = c["users_me_ms"]["whole_run"]["p99"] < TARGETS["users_me_p99_ms"]
    return met


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (comma-separated)")
    parser.add_argument("--workers", type=int, default=2, help="hub worker processes")
    parser.add_argument("--duration", type=float, default=30.0, help="part 3: seconds each stream lasts")
    parser.add_argument("--streams", type=int, default=1000, help="part 3: concurrent streams")
    parser.add_argument("--interval", type=float, default=1.0, help="part 3: seconds between chunks")
    parser.add_argument("--ramp", type=float, default=0.0, help="part 3: open the streams over this many s")
    parser.add_argument("--probe-rate", type=float, default=5.0, help="part 3: /users/me requests per s")
    parser.add_argument("--ttfc-requests", type=int, default=1000, help="part 1: requests each side")
    parser.add_argument("--ttfc-blocks", type=int, default=10, help="part 1: alternating blocks")
    parser.add_argument("--chunks", type=int, default=1000, help="part 2: chunks per stream")
    parser.add_argument("--chunk-streams", type=int, default=40, help="part 2: streams measured")
    parser.add_argument("--chunk-concurrency", type=int, default=4, help="part 2: streams at once")
    parser.add_argument("--paced-streams", type=int, default=100, help="part 2, paced: streams at once")
    parser.add_argument("--paced-chunks", type=int, default=100, help="part 2, paced: chunks per stream")
    parser.add_argument("--paced-interval", type=float, default=0.02, help="part 2, paced: s between chunks")
    parser.add_argument("--hub-env", action="append", default=[], help="NAME=VALUE for the hub")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit = off for the bench database: commits stop waiting for the WAL flush"
        " (the disk's latency out of the figures; see bench/README.md)",
    )
    parser.add_argument("--max-load", type=float, default=0.0, help="wait (≤ 10 min) for a lower load")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p}

    if args.max_load:
        wait_quiet(args.max_load)
    results: dict[str, Any] = {"machine": machine(), "workers": args.workers, "args": vars(args)}
    print(f"machine: {results['machine']}", flush=True)
    checks: dict[str, dict[str, Any]] = {}
    hub_env = {"SWEEP_INTERVAL_SECONDS": "3600"}
    hub_env.update(dict(kv.split("=", 1) for kv in args.hub_env))
    held = Shape(max(1, round(args.duration / args.interval)), args.interval)
    paced = Shape(args.paced_chunks, args.paced_interval)
    shapes = [Shape(TTFC_CHUNKS, 0), Shape(TTFC_CHUNKS, 0, plain=True), Shape(args.chunks, 0), Shape(1, 0)]
    shapes += [paced, held]
    users = max(args.streams, args.chunk_concurrency, args.paced_streams, 1) + 1
    with sse_upstream() as upstream, fresh_database(args.pg_url, keep=args.keep_db) as db_url:
        if args.async_commit:  # before the hub connects: its sessions take the database's setting
            name = make_url(db_url).database
            admin(args.pg_url, f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        seeded = asyncio.run(seed(db_url, users=users, upstream_url=None))
        tools = asyncio.run(add_tools(db_url, upstream, shapes))
        headers = [{"Authorization": f"Bearer {t}"} for t in seeded.tokens]
        with running_hub(db_url, workers=args.workers, env=hub_env) as hub:
            world = World(hub, db_url, upstream, headers[1:], headers[0], tools)
            plan: list[tuple[int, str, Callable[[], tuple[dict[str, Any], list[tuple[Report, Shape]]]]]] = [
                (1, "ttfc", lambda: part_ttfc(world, args.ttfc_requests, args.ttfc_blocks)),
                (
                    2,
                    "cpu_per_chunk",
                    lambda: part_cpu(
                        world,
                        args.chunks,
                        args.chunk_streams,
                        args.chunk_concurrency,
                        Paced(args.paced_streams, args.paced_chunks, args.paced_interval),
                    ),
                ),
                (
                    3,
                    "concurrent",
                    lambda: part_concurrent(
                        world, args.streams, args.duration, args.interval, args.ramp, args.probe_rate
                    ),
                ),
            ]
            for number, name, run in plan:
                if number not in parts:
                    continue
                before = totals(db_url)
                result, runs = run()
                check = accounting(before, settled(db_url), runs)
                result["accounting"] = check
                results[name] = result
                checks[name] = check
                print_check(check)
    results["targets_met"] = targets_met(results)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"targets met: {results['targets_met']}; load average at the end {results['loadavg_at_end']}")
    dump(args.json, results)
    exact = all(c["exact"] for c in checks.values())
    if not exact:
        print("ACCOUNTING CHECK FAILED")
        return 1
    if args.strict and not all(results["targets_met"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

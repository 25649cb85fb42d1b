"""A closed-loop HTTP/1.1 load generator for the hub: many keep-alive connections, mixed requests.

Why not wrk alone: the scenarios need per-request-class latency (reads vs invocations) and an
*exact* count of successful invocations to compare with the usage logs. This generator stops
sending at the deadline but waits for every request already sent, so nothing is in flight
when it reports. It runs in separate processes (`run_load(procs=...)`) so it does not share
the hub's or the caller's interpreter; on a small machine it still competes with the hub for
CPU, so its own CPU time is reported alongside the figures.

Each connection belongs to one caller (a bearer token) and picks its next request at random
with the mix's weights; with `think` > 0 it pauses a random 0..2*think seconds between requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
INVOKE_BODY = b'{"input":{"text":"hello load benchmark"}}'


@dataclass
class ClassStats:
    latencies_ms: list[float] = field(default_factory=list)
    starts_s: list[float] = field(default_factory=list)  # when each request was sent, from start_at
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.statuses.values())


def build_requests(
    host: str, port: int, token: str, tool_id: str | None, mix: dict[str, float]
) -> list[tuple[str, bytes]]:
    auth = f"Authorization: Bearer {token}\r\n"
    base = f"Host: {host}:{port}\r\n{auth}"
    out: list[tuple[str, bytes]] = []
    for name in mix:
        if name == "invoke":
            assert tool_id is not None
            out.append(
                (
                    name,
                    (
                        f"POST /api/v1/tools/{tool_id}/invoke HTTP/1.1\r\n{base}"
                        f"Content-Type: application/json\r\nContent-Length: {len(INVOKE_BODY)}\r\n\r\n"
                    ).encode()
                    + INVOKE_BODY,
                )
            )
        elif name == "health":
            out.append((name, f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()))
        else:
            path = {"me": "/api/v1/users/me", "summary": "/api/v1/usage/summary", "tools": "/api/v1/tools"}[
                name
            ]
            out.append((name, f"GET {path} HTTP/1.1\r\n{base}\r\n".encode()))
    return out


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep_alive) after reading one whole response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    chunked = False
    close = False
    for line in head.split(b"\r\n")[1:]:
        low = line.lower()
        if low.startswith(b"content-length:"):
            length = int(line[15:])
        elif low.startswith(b"transfer-encoding:") and b"chunked" in low:
            chunked = True
        elif low.startswith(b"connection:") and b"close" in low:
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length > 0:
        await reader.readexactly(length)
    return status, not close


async def _connection(
    host: str,
    port: int,
    requests: list[tuple[str, bytes]],
    weights: list[float],
    start_at: float,
    deadline: float,
    think: float,
    ramp: float,
    rng: random.Random,
    stats: dict[str, ClassStats],
    timeline: Counter[int],
    status_timeline: Counter[str],
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    if ramp:  # connections open spread over the ramp, as users arrive, not in one millisecond
        await asyncio.sleep(rng.uniform(0, ramp))
    elif think:  # users arrive spread over one think time
        await asyncio.sleep(rng.uniform(0, 2 * think))
    while time.time() < deadline:
        if writer is not None and reader is not None and reader.at_eof():
            # the server closed the idle keep-alive connection (uvicorn: after 5 s): a client
            # opens a new one rather than sending into a closed socket
            writer.close()
            writer = None
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                stats["connect"].statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
                continue
        assert reader is not None
        name, raw = rng.choices(requests, weights)[0]
        sent_at = time.time() - start_at
        t0 = time.perf_counter()
        try:
            writer.write(raw)
            status, keep = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            stats[name].statuses[type(exc).__name__] += 1
            status_timeline[f"{int((time.time() - start_at) * 10)}|{type(exc).__name__}"] += 1
            writer.close()
            writer = None
            await asyncio.sleep(0.05)
            continue
        t1 = time.perf_counter()
        st = stats[name]
        st.latencies_ms.append(round((t1 - t0) * 1000, 2))
        st.starts_s.append(round(sent_at, 2))
        st.statuses[str(status)] += 1
        now = time.time() - start_at
        timeline[int(now)] += 1
        status_timeline[f"{int(now * 10)}|{status}"] += 1
        if not keep:
            writer.close()
            writer = None
        if think:
            await asyncio.sleep(rng.uniform(0, 2 * think))
    if writer is not None:
        writer.close()


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec["host"], spec["port"]
    mix: dict[str, float] = spec["mix"]
    stats: dict[str, ClassStats] = {name: ClassStats() for name in [*mix, "connect"]}
    timeline: Counter[int] = Counter()
    status_timeline: Counter[str] = Counter()
    start_at = float(spec["start_at"])
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    deadline = start_at + float(spec["duration"])
    tasks = []
    for i, token in enumerate(spec["tokens"]):
        reqs = build_requests(host, port, token, spec.get("tool_id"), mix)
        rng = random.Random(spec["seed"] * 100003 + i)
        tasks.append(
            _connection(
                host,
                port,
                reqs,
                [mix[n] for n, _ in reqs],
                start_at,
                deadline,
                spec["think"],
                spec.get("ramp", 0.0),
                rng,
                stats,
                timeline,
                status_timeline,
            )
        )
    await asyncio.gather(*tasks)
    cpu = os.times()
    return {
        "classes": {
            n: {"latencies_ms": s.latencies_ms, "starts_s": s.starts_s, "statuses": dict(s.statuses)}
            for n, s in stats.items()
        },
        "timeline": dict(timeline),
        "status_timeline": dict(status_timeline),
        "ended_at": time.time(),
        "cpu_seconds": cpu.user + cpu.system,
    }


# -------------------------------------------------------------------------- aggregation


def pct(data: list[float], p: float) -> float:
    if not data:
        return float("nan")
    data = sorted(data)
    return data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))]


@dataclass
class LoadReport:
    connections: int
    duration: float
    seconds: float  # from the common start to the last process's end (includes the drain)
    classes: dict[str, dict[str, Any]]
    timeline: dict[int, int]
    loadgen_cpu_seconds: float
    start_at: float = 0.0
    status_timeline: dict[tuple[int, str], int] = field(default_factory=dict)

    def summary(self, classes: list[str] | None = None, skip: float = 0.0) -> dict[str, Any]:
        """Counts and latency percentiles; with `skip`, the percentiles (`*_ms`) cover only the
        requests sent at least `skip` seconds into the run (steady state, ramp-up excluded)."""
        names = classes or [n for n in self.classes if n != "connect"]
        lat = [
            x
            for n in names
            for x, at in zip(self.classes[n]["latencies_ms"], self.classes[n]["starts_s"], strict=True)
            if at >= skip
        ]
        statuses: Counter[str] = Counter()
        for n in names:
            statuses.update(self.classes[n]["statuses"])
        ok = sum(v for k, v in statuses.items() if k.startswith("2"))
        total = sum(statuses.values())
        return {
            "requests": total,
            "ok": ok,
            "errors": total - ok,
            "statuses": dict(statuses),
            "rps": total / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(lat, 50),
            "p90_ms": pct(lat, 90),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
        }

    def steady_rps(self, skip: int = 5) -> float:
        """Completions per second over the full seconds after the first `skip` (ramp-up)."""
        secs = list(range(skip, int(self.duration)))
        if not secs:
            return 0.0
        return sum(self.timeline.get(s, 0) for s in secs) / len(secs)

    def per_class(self) -> dict[str, dict[str, Any]]:
        return {n: self.summary([n]) for n in self.classes if n != "connect" and self.classes[n]["statuses"]}

    def connect_errors(self) -> dict[str, int]:
        return dict(self.classes["connect"]["statuses"])


def run_load(
    *,
    host: str,
    port: int,
    tokens: list[str],
    tool_id: str | None,
    mix: dict[str, float],
    connections: int,
    duration: float,
    procs: int = 2,
    think: float = 0.0,
    ramp: float = 0.0,
    seed: int = 1,
) -> LoadReport:
    """`connections` connections (connection i acts for tokens[i % len]) split over `procs`
    processes, all starting together, for `duration` seconds; waits for every response."""
    procs = max(1, min(procs, connections))
    start_at = time.time() + 1.0 + 0.002 * connections  # time for the processes to start
    children = []
    outdir = Path(tempfile.mkdtemp(prefix="joyhub-loadgen-"))
    for k in range(procs):
        mine = [tokens[i % len(tokens)] for i in range(k, connections, procs)]
        spec = {
            "host": host,
            "port": port,
            "tokens": mine,
            "tool_id": tool_id,
            "mix": mix,
            "duration": duration,
            "think": think,
            "ramp": ramp,
            "start_at": start_at,
            "seed": seed * 1000 + k,
            "out": str(outdir / f"part-{k}.json"),
        }
        children.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "loadgen.py")],
                stdin=subprocess.PIPE,
                text=True,
            )
        )
        assert children[-1].stdin is not None
        children[-1].stdin.write(json.dumps(spec))
        children[-1].stdin.close()
    parts = []
    for k, child in enumerate(children):
        if child.wait() != 0:
            raise RuntimeError("load generator process failed")
        part_path = outdir / f"part-{k}.json"
        parts.append(json.loads(part_path.read_text()))
        part_path.unlink()
    outdir.rmdir()
    classes: dict[str, dict[str, Any]] = {}
    timeline: Counter[int] = Counter()
    status_timeline: Counter[tuple[int, str]] = Counter()
    for part in parts:
        for key, n in part["status_timeline"].items():
            tenth, status = key.split("|", 1)
            status_timeline[(int(tenth), status)] += n
        for name, data in part["classes"].items():
            agg = classes.setdefault(name, {"latencies_ms": [], "starts_s": [], "statuses": Counter()})
            agg["latencies_ms"].extend(data["latencies_ms"])
            agg["starts_s"].extend(data["starts_s"])
            agg["statuses"].update(data["statuses"])
        timeline.update({int(k): v for k, v in part["timeline"].items()})
    ended = max(p["ended_at"] for p in parts)
    return LoadReport(
        connections=connections,
        duration=duration,
        seconds=ended - start_at,
        classes={
            n: {"latencies_ms": d["latencies_ms"], "starts_s": d["starts_s"], "statuses": dict(d["statuses"])}
            for n, d in classes.items()
        },
        timeline=dict(timeline),
        loadgen_cpu_seconds=sum(p["cpu_seconds"] for p in parts),
        start_at=start_at,
        status_timeline=dict(status_timeline),
    )


def main() -> None:
    spec = json.loads(sys.stdin.read())
    try:
        import uvloop

        result = uvloop.run(_run(spec))
    except ImportError:
        result = asyncio.run(_run(spec))
    # a file, not stdout: the event loop may have left fd 1 non-blocking, and a big result
    # would then be cut at the pipe's 64 KiB
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

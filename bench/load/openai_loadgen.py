"""A closed-loop load generator for bench/openai_bench.py (its own process): `concurrency`
keep-alive connections POSTing one OpenAI chat completion body for `seconds`, each connection
with its own `Authorization` header (rotating through the given ones). Waits for the requests in
flight at the deadline, so the counts are exact. Prints one JSON line: requests, statuses,
latency percentiles, requests/s, and its own CPU seconds.

Run:  python bench/load/openai_loadgen.py SPEC_JSON
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from typing import Any

from loadgen import _read_response


async def _connection(spec: dict[str, Any], auth: str | None, stop_at: float, out: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    body = spec["body"].encode()
    head = f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}\r\nContent-Type: application/json\r\n"
    if auth:
        head += f"Authorization: {auth}\r\n"
    request = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        writer.write(request)
        status, keep = await _read_response(reader)
        out["latencies"].append((time.perf_counter() - started) * 1000)
        out["statuses"][str(status)] += 1
        if not keep:
            writer.close()
            reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    writer.close()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "statuses": Counter()}
    auths = spec.get("auth") or [None]
    began = time.monotonic()
    stop_at = began + spec["seconds"]
    await asyncio.gather(
        *(_connection(spec, auths[i % len(auths)], stop_at, out) for i in range(spec["concurrency"]))
    )
    elapsed = time.monotonic() - began
    lat = sorted(out["latencies"])
    usage = resource.getrusage(resource.RUSAGE_SELF)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else 0.0

    return {
        "requests": len(lat),
        "statuses": dict(out["statuses"]),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


if __name__ == "__main__":
    try:
        import uvloop

        result = uvloop.run(run(json.loads(sys.argv[1])))
    except ImportError:
        result = asyncio.run(run(json.loads(sys.argv[1])))
    print(json.dumps(result))

"""Scenario (b): many concurrent authenticated users mixing reads and invocations (issue 7, SC-002).

    .venv/bin/python bench/load/mixed.py [--workers 2] [--high 1000] [--high-duration 180] [--json out.json]

1. a fresh database on the system PostgreSQL, `--users` callers (live session, enterprise
   subscription with its limit raised: generous quotas), one tool on a fast mock upstream;
2. `joyhub serve --workers N` (LOG_LEVEL=WARNING);
3. warm-up, then `--low` connections (default 50) for `--low-duration` s, then `--high`
   connections (default 1,000) for `--high-duration` s; every connection is one user sending
   back-to-back (closed loop) a random mix of GET /users/me, GET /usage/summary, GET /tools and
   POST /tools/{id}/invoke (`--mix`);
4. per phase: throughput (steady state, ramp-up excluded), latency by class, errors, and the
   ledger check: successful invocation responses == new `success` usage logs, nothing
   `pending`, reserved or in flight, sum of subscriptions' tokens_used == sum of the logs;
5. each worker's RSS every `--rss-every` s during the high phase and after a short idle.

Targets: errors 0, lost usage 0, rps(high)/rps(low) >= 0.9, p99 of reads < 1 s at `--high`,
worker RSS < 150 MiB with no upward trend. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import harness
from loadgen import LoadReport, run_load

READS = ["me", "summary", "tools"]


def parse_mix(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, weight = part.split("=")
        out[name.strip()] = float(weight)
    return out


def phase(
    hub: harness.Hub, seeded: harness.Seeded, db_url: str, *, connections: int, duration: float, args: Any
) -> dict[str, Any]:
    before = harness.ledger_now(db_url)
    cpu0 = hub.cpu_seconds()
    load0 = os.getloadavg()[0]
    report: LoadReport = run_load(
        host="127.0.0.1",
        port=hub.port,
        tokens=seeded.tokens,
        tool_id=seeded.tool_id,
        mix=parse_mix(args.mix),
        connections=connections,
        duration=duration,
        procs=args.procs,
        think=args.think,
        ramp=args.ramp if connections == args.high else 0.0,
        seed=connections,
    )
    hub_cpu = hub.cpu_seconds() - cpu0
    load1 = os.getloadavg()[0]
    after = harness.ledger_now(db_url)
    invoke = report.summary(["invoke"])
    invoke_ok = invoke["statuses"].get("200", 0)
    new_success = after["success"] - before["success"]
    accounting = {
        "invocations_200": invoke_ok,
        "new_success_logs": new_success,
        "lost_usage_records": max(0, invoke_ok - new_success),
        "extra_usage_records": max(0, new_success - invoke_ok),
        "new_failed_logs": after["failed"] - before["failed"],
        "pending": after["pending"],
        "tokens_used_equals_sum_of_logs": after["tokens_used"] == after["log_tokens"],
        "reserved": after["tokens_reserved"],
        "inflight": after["inflight"],
    }
    accounting["exact"] = (
        accounting["lost_usage_records"] == 0
        and accounting["extra_usage_records"] == 0
        and accounting["pending"] == 0
        and accounting["tokens_used_equals_sum_of_logs"]
        and accounting["reserved"] == 0
        and accounting["inflight"] == 0
    )
    return {
        "connections": connections,
        "duration_s": duration,
        "all": report.summary(),
        "reads": report.summary(READS),
        # the same, over requests sent after the ramp-up (all connections open and cycling)
        "reads_steady": report.summary(READS, skip=min(10, int(duration) // 4)),
        "invoke_steady": report.summary(["invoke"], skip=min(10, int(duration) // 4)),
        "by_class": report.per_class(),
        "steady_rps": report.steady_rps(skip=min(10, int(duration) // 4)),
        "connect_errors": report.connect_errors(),
        "timeline": report.timeline,
        "loadgen_cpu_seconds": round(report.loadgen_cpu_seconds, 1),
        "hub_cpu_seconds": round(hub_cpu, 1),
        "hub_cpu_ms_per_request": round(hub_cpu * 1000 / max(1, report.summary()["requests"]), 2),
        "loadavg_start_end": [round(load0, 2), round(load1, 2)],
        "accounting": accounting,
    }


def line(name: str, res: dict[str, Any]) -> str:
    a, r = res["all"], res["reads"]
    inv = res["by_class"].get("invoke", {})
    return (
        f"{name}: {res['connections']} conns  steady {res['steady_rps']:.0f} req/s  "
        f"errors {a['errors']} (connect {sum(res['connect_errors'].values())})  "
        f"reads p50 {r['p50_ms']:.0f} p99 {r['p99_ms']:.0f} ms "
        f"(steady p99 {res['reads_steady']['p99_ms']:.0f})  "
        f"invoke p50 {inv.get('p50_ms', float('nan')):.0f} p99 {inv.get('p99_ms', float('nan')):.0f} ms "
        f"(steady p99 {res['invoke_steady']['p99_ms']:.0f})  "
        f"hub cpu {res['hub_cpu_ms_per_request']} ms/req  loadgen cpu {res['loadgen_cpu_seconds']} s  "
        f"load {res['loadavg_start_end']}  accounting exact={res['accounting']['exact']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=harness.DEFAULT_PG)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--low", type=int, default=50)
    parser.add_argument("--high", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--low-duration", type=float, default=60)
    parser.add_argument("--high-duration", type=float, default=180)
    parser.add_argument("--mix", default="me=3,summary=2,tools=2,invoke=3")
    parser.add_argument("--think", type=float, default=0.0, help="mean pause between a user's requests (s)")
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="open the --high connections spread over this many seconds (0: all at once)",
    )
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--rss-every", type=float, default=15)
    parser.add_argument(
        "--idle-after", type=float, default=20, help="idle seconds before the last RSS sample"
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load to drop below")
    parser.add_argument("--hub-env", action="append", default=[], help="extra NAME=VALUE for the hub")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results: dict[str, Any] = {"args": vars(args)}
    hub_env = dict(kv.split("=", 1) for kv in args.hub_env)
    print(f"waiting for load < {args.max_load}: {harness.wait_quiet(args.max_load):.2f}", flush=True)
    results["machine"] = harness.machine()
    print(results["machine"], flush=True)
    with harness.mock_upstream() as upstream_url, harness.fresh_database(args.pg_url, args.keep_db) as db_url:
        seeded = asyncio.run(harness.seed(db_url, users=args.users, upstream_url=upstream_url))
        with harness.running_hub(db_url, workers=args.workers, env=hub_env) as hub:
            results["workers_pids"] = [p.pid for p in hub.workers()]
            warm = phase(hub, seeded, db_url, connections=args.low, duration=args.warmup, args=args)
            print(line("warm-up", warm), flush=True)
            low = phase(hub, seeded, db_url, connections=args.low, duration=args.low_duration, args=args)
            print(line("low", low), flush=True)
            with harness.RssSampler(hub, every=args.rss_every) as rss:
                high = phase(
                    hub, seeded, db_url, connections=args.high, duration=args.high_duration, args=args
                )
            print(line("high", high), flush=True)
            time.sleep(args.idle_after)
            rss.sample()
            for row in rss.samples:
                print(
                    f"  rss t={row['t']:>6}s load {row['load1']:.2f} "
                    + "  ".join(f"{k}: {v} MiB" for k, v in row.items() if k not in ("t", "load1"))
                )
            results.update(warmup=warm, low=low, high=high, rss_mib=rss.samples)
        results["hub_exit_status"] = hub.proc.returncode

    worker_keys = [k for k in results["rss_mib"][0] if k not in ("t", "load1")]
    last = results["rss_mib"][-1]
    peak = max(v for row in results["rss_mib"] for k, v in row.items() if k not in ("t", "load1"))
    ratio = high["steady_rps"] / low["steady_rps"] if low["steady_rps"] else 0.0
    errors = sum(r["all"]["errors"] + sum(r["connect_errors"].values()) for r in (warm, low, high))
    checks = {
        "errors_zero": errors == 0,
        "lost_usage_zero": all(r["accounting"]["exact"] for r in (warm, low, high)),
        "throughput_ratio": round(ratio, 3),
        "throughput_ratio_ok": ratio >= 0.9,
        "read_p99_ms_high": high["reads"]["p99_ms"],
        "read_p99_ms_high_steady": high["reads_steady"]["p99_ms"],
        "read_p99_ok": high["reads"]["p99_ms"] < 1000,
        "rss_peak_mib": peak,
        "rss_last_mib": {k: last.get(k) for k in worker_keys},
        "rss_ok": peak < 150,
        "hub_exit_status": results["hub_exit_status"],
    }
    results["checks"] = checks
    print(checks)
    harness.dump(args.json, results)
    passed = (
        all(v for k, v in checks.items() if k.endswith(("_ok", "_zero"))) and checks["hub_exit_status"] == 0
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

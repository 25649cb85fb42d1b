"""Fault drill: restart the SYSTEM PostgreSQL under load and watch the hub ride it out (issue 7).

    .venv/bin/python bench/load/pg_restart.py [--connections 50] [--duration 40] [--restart-at 12]

NOT a test: it restarts the whole PostgreSQL 15 cluster of this machine with
`pg_ctlcluster --skip-systemctl-redirect 15 main restart` (as root), which cuts off every other
client of that server too. It refuses to run while other databases have client connections
unless --force.

1. a fresh database on the system server, callers and a tool on a fast mock upstream;
2. `joyhub serve --workers 2`;
3. closed-loop load (reads and invocations, `--connections` users) for `--duration` s; at
   `--restart-at` s PostgreSQL is restarted (the command returns once the server accepts
   connections again);
4. reports: answers by status (the outage must show as 503 SERVICE_UNAVAILABLE, never 500 or a
   dropped connection), the outage window seen by clients, seconds from "PostgreSQL is back" to
   the last error (recovery), and the ledger: successful invocation responses == `success`
   usage logs (none lost, none duplicated), tokens_used == sum of logs. Calls whose settlement
   could not be written during the outage answered 503 and stay `pending` (uncharged) until the
   sweep closes them as ABANDONED; their count is reported, and with --sweep the script waits
   for the stale threshold and runs `joyhub sweep` to show them closed and their reservations
   released.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import harness
from loadgen import LoadReport, run_load

RESTART = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"]


async def _other_clients(pg_url: str, ours: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(harness.asyncpg_dsn(pg_url))
    try:
        rows = await conn.fetch(
            "SELECT datname, count(*) AS n FROM pg_stat_activity"
            " WHERE datname IS NOT NULL AND pid <> pg_backend_pid() AND datname <> $1"
            " AND backend_type = 'client backend' GROUP BY datname",
            ours,
        )
    finally:
        await conn.close()
    return {r["datname"]: r["n"] for r in rows}


async def _shorten_tool(db_url: str, tool_id: str) -> None:
    """Make the tool's worst case short, so the sweep may close a stranded call within a minute."""
    import asyncpg

    conn = await asyncpg.connect(harness.asyncpg_dsn(db_url))
    try:
        await conn.execute("UPDATE tools SET timeout_seconds = 2, max_attempts = 1 WHERE id = $1", tool_id)
    finally:
        await conn.close()


def analyse(report: LoadReport, restart_begin: float, restart_end: float) -> dict[str, Any]:
    """Outage window and recovery, in seconds relative to the restart command."""
    by_tenth: dict[int, dict[str, int]] = defaultdict(dict)
    for (tenth, status), n in report.status_timeline.items():
        by_tenth[tenth][status] = by_tenth[tenth].get(status, 0) + n
    bad = sorted(t for t, st in by_tenth.items() if any(s != "200" for s in st))
    begin_rel = restart_begin - report.start_at
    end_rel = restart_end - report.start_at
    out: dict[str, Any] = {
        "restart_command_seconds": round(restart_end - restart_begin, 2),
        "first_error_after_restart_began_s": None,
        "last_error_after_restart_began_s": None,
        "recovery_after_pg_back_s": 0.0,
    }
    if bad:
        out["first_error_after_restart_began_s"] = round(bad[0] / 10 - begin_rel, 1)
        out["last_error_after_restart_began_s"] = round((bad[-1] + 1) / 10 - begin_rel, 1)
        out["recovery_after_pg_back_s"] = round(max(0.0, (bad[-1] + 1) / 10 - end_rel), 1)
    # per-second answers around the restart (second 0 = the restart command began), for the record
    per_second: dict[int, dict[str, int]] = {}
    for sec in range(int(begin_rel) - 2, int(end_rel) + 8):
        agg: Counter[str] = Counter()
        for tenth in range(sec * 10, sec * 10 + 10):
            agg.update(by_tenth.get(tenth, {}))
        per_second[sec - int(begin_rel)] = dict(sorted(agg.items()))
    out["per_second"] = per_second
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=harness.DEFAULT_PG)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--restart-at", type=float, default=12)
    parser.add_argument("--mix", default="me=3,summary=2,tools=2,invoke=3")
    parser.add_argument(
        "--sweep", action="store_true", help="wait, then run `joyhub sweep` for stranded calls"
    )
    parser.add_argument("--force", action="store_true", help="restart even if other databases are in use")
    parser.add_argument("--dry-run", action="store_true", help="everything but the restart itself")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mixed import parse_mix

    results: dict[str, Any] = {"args": vars(args), "machine": harness.machine()}
    with harness.mock_upstream() as upstream_url, harness.fresh_database(args.pg_url) as db_url:
        ours = db_url.rsplit("/", 1)[1]
        others = asyncio.run(_other_clients(args.pg_url, ours))
        if others and not args.force and not args.dry_run:
            print(f"refusing to restart PostgreSQL: other databases have clients: {others} (use --force)")
            return 2
        seeded = asyncio.run(harness.seed(db_url, users=args.users, upstream_url=upstream_url))
        if args.sweep:
            asyncio.run(_shorten_tool(db_url, seeded.tool_id))
        env = {"STALE_INVOCATION_SECONDS": "10"} if args.sweep else {}
        with harness.running_hub(db_url, workers=args.workers, env=env) as hub:
            holder: dict[str, Any] = {}

            def load() -> None:
                holder["report"] = run_load(
                    host="127.0.0.1",
                    port=hub.port,
                    tokens=seeded.tokens,
                    tool_id=seeded.tool_id,
                    mix=parse_mix(args.mix),
                    connections=args.connections,
                    duration=args.duration,
                    procs=1,
                )

            before = harness.ledger_now(db_url)
            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(1.0 + 0.002 * args.connections + args.restart_at)
            print("restarting PostgreSQL ...", flush=True)
            restart_begin = time.time()
            command = ["true"] if args.dry_run else RESTART
            done = subprocess.run(command, capture_output=True, text=True)
            restart_end = time.time()
            print(
                f"restart command: exit {done.returncode} in {restart_end - restart_begin:.2f} s", flush=True
            )
            if done.returncode != 0:
                print(done.stdout, done.stderr)
            thread.join()
            report: LoadReport = holder["report"]
            time.sleep(1.0)
            after = harness.ledger_now(db_url)
            hub_log = hub.log_tail(200000)

            invoke = report.summary(["invoke"])
            ok_invocations = invoke["statuses"].get("200", 0)
            new_success = after["success"] - before["success"]
            results["load"] = {"all": report.summary(), "by_class": report.per_class()}
            results["outage"] = analyse(report, restart_begin, restart_end)
            statuses = report.summary()["statuses"]
            results["answers"] = {
                "total": sum(statuses.values()),
                "by_status": statuses,
                "503": statuses.get("503", 0),
                "500": statuses.get("500", 0),
                "other_non_200": {k: v for k, v in statuses.items() if k not in ("200", "503")},
            }
            results["ledger"] = {
                "invocations_200": ok_invocations,
                "new_success_logs": new_success,
                "lost": max(0, ok_invocations - new_success),
                "duplicated_or_unanswered": max(0, new_success - ok_invocations),
                "pending_after": after["pending"],
                "failed_logs": after["failed"],
                "tokens_used_equals_sum_of_logs": after["tokens_used"] == after["log_tokens"],
                "reserved_after": after["tokens_reserved"],
                "inflight_after": after["inflight"],
            }
            results["hub_log_errors"] = sorted(
                {
                    line.split('"message": "', 1)[1].split('"', 1)[0]
                    for line in hub_log.splitlines()
                    if '"level": "ERROR"' in line
                }
            )
        if args.sweep and after["pending"]:
            wait = 2 * 1 + 5 * 1 + 60 + 5  # the tool's worst case + ledger slack
            print(f"waiting {wait} s for the stale threshold, then `joyhub sweep`", flush=True)
            time.sleep(wait)
            sweep = subprocess.run(
                [str(harness.VENV_BIN / "joyhub"), "sweep"],
                env=harness.hub_env(db_url, harness.Path("/tmp"), STALE_INVOCATION_SECONDS="10"),
                capture_output=True,
                text=True,
            )
            swept = harness.ledger_now(db_url)
            results["after_sweep"] = {
                "sweep_exit": sweep.returncode,
                "pending": swept["pending"],
                "failed_logs": swept["failed"],
                "reserved": swept["tokens_reserved"],
                "inflight": swept["inflight"],
                "tokens_used_equals_sum_of_logs": swept["tokens_used"] == swept["log_tokens"],
            }
    for key in ("answers", "outage", "ledger", "after_sweep", "hub_log_errors"):
        if key in results:
            value = results[key]
            if key == "outage":
                value = {k: v for k, v in value.items() if k != "per_second"}
            print(f"{key}: {value}")
    for sec, st in results["outage"]["per_second"].items():
        print(f"  t={sec:>3}s {st}")
    harness.dump(args.json, results)
    ledger = results["ledger"]
    ok = (
        results["answers"]["500"] == 0
        and not results["answers"]["other_non_200"]
        and ledger["lost"] == 0
        and ledger["duplicated_or_unanswered"] == 0
        and ledger["tokens_used_equals_sum_of_logs"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

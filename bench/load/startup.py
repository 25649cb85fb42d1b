"""Start-up to ready with an existing database (target < 3 s), and the time to stop.

    .venv/bin/python bench/load/startup.py [--runs 5] [--workers 1,2]

A database on the system PostgreSQL is created and migrated once (by a first `joyhub serve`,
not timed). Then, for each worker count, `joyhub serve` is started `--runs` times: the time from
the process start to the first 200 on `/ready` (what a load balancer waits for), the time until
*every* worker has finished its start-up (from the workers' own "hub started" log lines), and
the time from SIGTERM to exit. `serve` applies pending migrations first, so the figure includes
the check that there are none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from typing import Any

import harness


def all_workers_started(hub: harness.Hub, workers: int, timeout: float = 30.0) -> float:
    """Seconds from the process start to the last worker's "hub started" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stamps = []
        for line in hub.log_path.read_text(errors="replace").splitlines():
            if '"hub started"' in line:
                stamps.append(datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp())
        if len(stamps) >= workers:
            return max(stamps) - hub.wall_started
        time.sleep(0.05)
    raise RuntimeError(f"not every worker started:\n{hub.log_tail()}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default=harness.DEFAULT_PG)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    print(f"waiting for load < {args.max_load}: {harness.wait_quiet(args.max_load):.2f}", flush=True)
    results: dict[str, Any] = {"args": vars(args), "machine": harness.machine()}
    with harness.fresh_database(args.pg_url) as db_url:
        with harness.running_hub(db_url, workers=1):
            pass  # the database exists and is at head from here on
        for workers in [int(w) for w in args.workers.split(",")]:
            ready, every, stop = [], [], []
            for _ in range(args.runs):
                hub = harness.start_hub(db_url, workers=workers, env={"LOG_LEVEL": "INFO"})
                ready.append(harness.wait_ready(hub))
                every.append(all_workers_started(hub, workers))
                t0 = time.monotonic()
                code = harness.stop_hub(hub)
                stop.append(time.monotonic() - t0)
                if code != 0:
                    raise RuntimeError(f"exit status {code}:\n{hub.log_tail()}")
                hub.cleanup()
                time.sleep(0.5)
            row = {
                "ready_s": {"median": round(statistics.median(ready), 2), "max": round(max(ready), 2)},
                "all_workers_started_s": {
                    "median": round(statistics.median(every), 2),
                    "max": round(max(every), 2),
                },
                "sigterm_to_exit_s": {
                    "median": round(statistics.median(stop), 2),
                    "max": round(max(stop), 2),
                },
                "runs": [round(x, 2) for x in ready],
            }
            results[f"workers_{workers}"] = row
            print(f"--workers {workers}: {row}", flush=True)
    harness.dump(args.json, results)
    ok = all(v["ready_s"]["max"] < 3.0 for k, v in results.items() if k.startswith("workers_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Teams benchmark (issue 19): an organization whose 32 members call at c=32 against 32 personal
accounts in the same run, and the c=1 overhead of an organization call against a personal one.

What it does (the machinery of `gateway_bench.py`: the same mock upstream, hub and load
generators):

1. a fresh database, `joyhub serve --workers N` (default 2), the raw-asyncio mock upstream;
2. 32 personal callers (an enterprise subscription each) and one organization with 32 members on
   one enterprise subscription, every member with a per-member `token_limit` the run never
   reaches (so the member check and its reservation are on the path, without refusals);
3. interleaved rounds (personal, organization, personal, …, `--rounds` of each), so that the
   machine's drift hits both alike:
   - c=32: invocations/s of the 32 personal callers vs the 32 members (`X-Org-ID`);
   - c=1: p50/p99 of one personal caller vs one member;
   the medians of the rounds are compared: org/personal throughput (target ≥ 90 %) and the p50
   difference at c=1 (target ≤ 0.3 ms);
4. checks the organization's ledger after a fixed number of calls: every call logged with the
   organization, the subscription's tokens_used = Σ members' tokens_used = Σ logs, nothing held.

Run:  .venv/bin/python bench/org_bench.py [--duration 8] [--rounds 3] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

MEMBERS = 32


async def _seed_org(db_url: str, members: int) -> dict[str, Any]:
    """An organization with `members` members (user + session each, a per-member limit the run
    never reaches) on one enterprise subscription."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    sys.path.insert(0, str(gb.ROOT / "src"))
    from joyhub.core.security import create_access_token, hash_password_sync

    org_id = uuid.uuid4()
    password_hash = hash_password_sync("x", 4)
    tokens: list[str] = []
    eng = create_async_engine(db_url)
    async with eng.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO organizations (id, name, created_at, updated_at)"
                " VALUES (:id, 'Bench Org', now(), now())"
            ),
            {"id": org_id},
        )
        await conn.execute(
            text(
                "INSERT INTO subscriptions (id, org_id, plan_code, status, tokens_used, tokens_reserved,"
                " inflight, current_period_start, current_period_end, cancel_at_period_end, created_at,"
                " updated_at) VALUES (:id, :o, 'enterprise', 'active', 0, 0, 0, now(),"
                " now() + interval '30 days', false, now(), now())"
            ),
            {"id": uuid.uuid4(), "o": org_id},
        )
        for n in range(members):
            user_id, session_id = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                text(
                    "INSERT INTO users (id, name, email, password_hash, role, is_active, created_at,"
                    " updated_at) VALUES (:id, 'Member', :email, :ph, 'user', true, now(), now())"
                ),
                {"id": user_id, "email": f"member-{n}-{user_id.hex[:6]}@example.com", "ph": password_hash},
            )
            await conn.execute(
                text("INSERT INTO auth_sessions (id, user_id, created_at) VALUES (:id, :u, now())"),
                {"id": session_id, "u": user_id},
            )
            await conn.execute(
                text(
                    "INSERT INTO organization_members (org_id, user_id, role, token_limit, tokens_used,"
                    " tokens_reserved, joined_at) VALUES (:o, :u, :r, 1000000000000, 0, 0, now())"
                ),
                {"o": org_id, "u": user_id, "r": "owner" if n == 0 else "member"},
            )
            tokens.append(
                create_access_token(
                    user_id=user_id,
                    session_id=session_id,
                    role="user",
                    secret=gb.JWT_SECRET,
                    ttl=timedelta(hours=2),
                )
            )
    await eng.dispose()
    return {"org_id": str(org_id), "tokens": tokens}


async def _org_ledger(db_url: str, org_id: str) -> dict[str, int]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(db_url)
    async with eng.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM usage_logs WHERE org_id = :o AND status = 'success') AS ok,"
                    " (SELECT count(*) FROM usage_logs WHERE org_id = :o AND status <> 'success') AS other,"
                    " (SELECT COALESCE(sum(tokens_used), 0) FROM usage_logs WHERE org_id = :o) AS log_tokens,"
                    " (SELECT COALESCE(sum(tokens_used), 0) FROM organization_members WHERE org_id = :o)"
                    "   AS member_tokens,"
                    " (SELECT COALESCE(sum(tokens_reserved), 0) FROM organization_members WHERE org_id = :o)"
                    "   AS member_reserved,"
                    " s.tokens_used, s.tokens_reserved, s.inflight FROM subscriptions s WHERE s.org_id = :o"
                ),
                {"o": org_id},
            )
        ).one()
    await eng.dispose()
    return {k: int(v) for k, v in row._mapping.items()}


def _median(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--exact-calls", type=int, default=2000)
    parser.add_argument("--loadgen", default="auto", help="wrk | python | auto (wrk when installed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tool = args.loadgen if args.loadgen != "auto" else ("wrk" if shutil.which("wrk") else "python")
    print(f"load generator: {tool}; load average at start {os.getloadavg()}")

    mock_port = gb.free_port()
    mock = subprocess.Popen(
        [sys.executable, str(Path(gb.__file__)), "--serve-mock", str(mock_port)], start_new_session=True
    )
    upstream_url = f"http://127.0.0.1:{mock_port}/v1/run"
    db_name = f"joyhub_orgbench_{uuid.uuid4().hex[:8]}"
    from sqlalchemy.engine import make_url

    db_url = make_url(args.pg_url).set(database=db_name).render_as_string(hide_password=False)
    asyncio.run(gb._admin_sql(args.pg_url, f'CREATE DATABASE "{db_name}"'))
    results: dict[str, Any] = {
        "load_generator": tool,
        "workers": args.workers,
        "loadavg_at_start": os.getloadavg(),
        "duration_s": args.duration,
        "rounds": args.rounds,
    }
    hub = None
    c = args.concurrency
    try:
        time.sleep(0.5)
        port = gb.free_port()
        hub = gb.start_hub(db_url, args.workers, port, None)
        personal = asyncio.run(gb._seed(db_url, upstream_url, MEMBERS))
        org = asyncio.run(_seed_org(db_url, MEMBERS))
        url = f"http://127.0.0.1:{port}/api/v1/tools/{personal['tool_id']}/invoke"
        p_headers = [
            {"Content-Type": "application/json", "Authorization": f"Bearer {t}"} for t in personal["tokens"]
        ]
        o_headers = [
            {"Content-Type": "application/json", "Authorization": f"Bearer {t}", "X-Org-ID": org["org_id"]}
            for t in org["tokens"]
        ]
        gb.measure(tool, url, p_headers, gb.BODY, c, 3)  # warm-up of both paths
        gb.measure(tool, url, o_headers, gb.BODY, c, 3)
        runs: dict[str, list[dict[str, float]]] = {"p_c32": [], "o_c32": [], "p_c1": [], "o_c1": []}
        for r in range(args.rounds):
            for name, hdrs, conc in (
                ("p_c32", p_headers, c),
                ("o_c32", o_headers, c),
                ("p_c1", p_headers[:1], 1),
                ("o_c1", o_headers[:1], 1),
            ):
                m = gb.measure(tool, url, hdrs, gb.BODY, conc, args.duration)
                runs[name].append(m)
                print(gb._line(f"round {r + 1} {name}", m))
        results["runs"] = runs
        summary = {
            "personal_c32_rps": _median(runs["p_c32"], "rps"),
            "org_c32_rps": _median(runs["o_c32"], "rps"),
            "personal_c1_p50_ms": _median(runs["p_c1"], "p50_ms"),
            "org_c1_p50_ms": _median(runs["o_c1"], "p50_ms"),
            "personal_c1_p99_ms": _median(runs["p_c1"], "p99_ms"),
            "org_c1_p99_ms": _median(runs["o_c1"], "p99_ms"),
            "errors": sum(int(m["errors"]) for ms in runs.values() for m in ms),
        }
        summary["org_vs_personal_c32"] = summary["org_c32_rps"] / summary["personal_c32_rps"]
        summary["org_minus_personal_c1_p50_ms"] = summary["org_c1_p50_ms"] - summary["personal_c1_p50_ms"]
        results["summary"] = summary
        time.sleep(1.0)
        before = asyncio.run(_org_ledger(db_url, org["org_id"]))
        exact = gb.python_load(url, o_headers, gb.BODY, c, 3600, args.exact_calls)
        after = asyncio.run(_org_ledger(db_url, org["org_id"]))
        check = {
            "calls": exact.requests,
            "http_200": exact.ok,
            "new_success_logs": after["ok"] - before["ok"],
            "non_success_logs": after["other"],
            "tokens_used": after["tokens_used"],
            "sum_of_member_tokens": after["member_tokens"],
            "sum_of_logs": after["log_tokens"],
            "reserved_after": after["tokens_reserved"] + after["member_reserved"],
            "inflight_after": after["inflight"],
        }
        check["exact"] = (
            check["http_200"] == check["calls"] == check["new_success_logs"]
            and check["non_success_logs"] == 0
            and check["tokens_used"] == check["sum_of_member_tokens"] == check["sum_of_logs"]
            and check["reserved_after"] == 0
            and check["inflight_after"] == 0
        )
        results["accounting"] = check
        print(json.dumps(summary, indent=2))
        print(f"org accounting: {check}")
    finally:
        if hub is not None:
            gb.stop(hub)
        os.killpg(mock.pid, signal.SIGTERM)
        mock.wait()
        asyncio.run(gb._admin_sql(args.pg_url, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if results.get("accounting", {}).get("exact") else 1


if __name__ == "__main__":
    sys.exit(main())

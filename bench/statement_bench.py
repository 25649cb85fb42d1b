"""The metering statements of one call at a time, as a quiet hub runs them: each rendering, timed.

One caller admits and settles call after call through `MeteringStore` (no HTTP, no upstream),
on a fresh database, with plan, key-free limits configured as `gateway_bench.py --limits plan`
does. Every round alternates the two renderings of the same statements (`core/batch_sql.py`):

- `lone`: what the hub runs for a batch of one call (no adding up, no ordering, no lock pass);
- `batch`: the batch rendering, run for the same lone call (what the hub ran before).

Reported per rendering: the client-side round trip of the admission and of the settle (p50 and
p10, microseconds; a round trip includes PostgreSQL's commit), the median over rounds. Same-run
ratios are what to read on a shared machine.

    .venv/bin/python bench/statement_bench.py [--pg-url URL] [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import gateway_bench as gb  # noqa: E402  (the bench's seeding, shared)
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from joyhub.auth.credentials import Credential  # noqa: E402
from joyhub.core.config import Settings  # noqa: E402
from joyhub.core.db import make_engine  # noqa: E402
from joyhub.core.migrations import migrate_async  # noqa: E402
from joyhub.tools import metering  # noqa: E402
from joyhub.tools.metering import AdmitRequest, AdmitShape, MeteringStore, SettleRequest, SettleShape  # noqa: E402


@contextmanager
def rendering(many: bool) -> Iterator[None]:
    """Statements rendered as for a lone call (`many=False`, the hub's choice for one call) or as
    for a batch, whatever the batch."""
    admit_sql: Callable[[AdmitShape], Any] = metering._admit_sql
    settle_sql: Callable[[SettleShape], Any] = metering._settle_sql
    metering._admit_sql = lambda shape: admit_sql(dataclasses.replace(shape, many=many))  # type: ignore[assignment]
    metering._settle_sql = lambda shape: settle_sql(dataclasses.replace(shape, many=many))  # type: ignore[assignment]
    try:
        yield
    finally:
        metering._admit_sql = admit_sql  # type: ignore[assignment]
        metering._settle_sql = settle_sql  # type: ignore[assignment]


def _q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[round(p * (len(ordered) - 1))]


async def _calls(
    store: MeteringStore, tool_id: uuid.UUID, version: datetime, cred: Credential, n: int
) -> dict[str, float]:
    admits: list[float] = []
    settles: list[float] = []
    for _ in range(n):
        now = datetime.now(UTC)
        req = AdmitRequest(tool_id=tool_id, credential=cred, idempotency_key=None, now=now, reserve=100,
                           request_id=None, tool_version=version, go=True, log_id=uuid.uuid4())  # fmt: skip
        t0 = time.perf_counter()
        [result] = await store.admit_batch([req])
        t1 = time.perf_counter()
        if result.admission is None:
            raise RuntimeError(f"refused: {result.read}")
        settle = SettleRequest(
            admission=result.admission, status="success", tokens=12, token_source="reported", duration_ms=1,
            error_code=None, now=datetime.now(UTC), response_status=200, response_body=b"{}",
        )  # fmt: skip
        t2 = time.perf_counter()
        if not (await store.settle(settle)).settled:
            raise RuntimeError("not settled")
        t3 = time.perf_counter()
        admits.append((t1 - t0) * 1e6)
        settles.append((t3 - t2) * 1e6)
    warm = n // 10  # the first calls prepare statements and warm caches
    return {
        "admit_p50_us": _q(admits[warm:], 0.5),
        "admit_p10_us": _q(admits[warm:], 0.1),
        "settle_p50_us": _q(settles[warm:], 0.5),
        "settle_p10_us": _q(settles[warm:], 0.1),
    }


async def _run(db_url: str, calls: int, rounds: int) -> dict[str, Any]:
    await migrate_async(db_url)
    seeded = await gb._seed(db_url, "http://127.0.0.1:9/unused", 1)
    await gb._configure_limits(db_url, "plan", seeded["tool_id"])
    engine = make_engine(db_url, Settings(database_url=db_url, jwt_secret_key=gb.JWT_SECRET))
    store = MeteringStore(engine)
    tool_id, user_id = uuid.UUID(seeded["tool_id"]), uuid.UUID(seeded["user_ids"][0])
    async with engine.connect() as conn:
        session_id = (
            await conn.execute(text("SELECT id FROM auth_sessions WHERE user_id = :u"), {"u": user_id})
        ).scalar_one()
        version = (
            await conn.execute(text("SELECT updated_at FROM tools WHERE id = :t"), {"t": tool_id})
        ).scalar_one()
    cred = Credential(user_id=user_id, session_id=session_id)
    runs: dict[str, list[dict[str, float]]] = {"lone": [], "batch": []}
    try:
        for r in range(rounds):
            for name in ("lone", "batch") if r % 2 == 0 else ("batch", "lone"):
                with rendering(many=name == "batch"):
                    runs[name].append(await _calls(store, tool_id, version, cred, calls))
                print(name, json.dumps({k: round(v, 1) for k, v in runs[name][-1].items()}), flush=True)
    finally:
        await store.releases.wait()
        await engine.dispose()
    return {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--calls", type=int, default=2000, help="calls per rendering per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    db_name = f"joyhub_bench_{uuid.uuid4().hex[:8]}"
    db_url = make_url(args.pg_url).set(database=db_name).render_as_string(hide_password=False)
    asyncio.run(gb._admin_sql(args.pg_url, f'CREATE DATABASE "{db_name}"'))
    try:
        result = asyncio.run(_run(db_url, args.calls, args.rounds))
    finally:
        asyncio.run(gb._admin_sql(args.pg_url, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    lone, batch = result["lone"], result["batch"]
    print(f"{'':8} {'admit p50':>10} {'settle p50':>11}  (µs, median of {args.rounds} rounds)")
    for name, m in result.items():
        print(f"{name:8} {m['admit_p50_us']:10.1f} {m['settle_p50_us']:11.1f}")
    total = (lone["admit_p50_us"] + lone["settle_p50_us"]) / (batch["admit_p50_us"] + batch["settle_p50_us"])
    print(f"lone / batch, admission + settle: {total:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

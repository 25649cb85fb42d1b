"""Schemathesis against the hub's own OpenAPI schema, over real HTTP (issue 7).

A short budget runs in `make test`; set `SCHEMATHESIS_MAX_EXAMPLES` (and, for nightly runs,
`SCHEMATHESIS_PHASES=examples,coverage,fuzzing,stateful`) for a longer one, e.g.
`SCHEMATHESIS_MAX_EXAMPLES=500 .venv/bin/python -m pytest tests/contract -p no:xdist`.

The caller is an admin holding an API key — so every route is reachable, and fuzzing
`/auth/logout-all` or a password change cannot end the run's own credentials. Checks: no 5xx,
every status code and content type documented, every response matching its schema, and the
`Allow` header of 405s. `/ready` is left out (see below). `positive_data_acceptance` is left out
on purpose: the schema cannot express cross-field and database rules (a plan must exist, a date
range must not be inverted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from joyhub.core.security import new_api_key, token_digest
from tests.factories import make_admin
from tests.served_hub import ServedDatabase, hub_process, served_database, wait_ready

pytestmark = pytest.mark.contract

__all__ = ["served_database"]  # the fixture, used by name

ST = Path(sys.executable).with_name("st")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "allow_header_conformance",
    ]
)

# The fuzzer creates tools (from the ToolCreate example, or its own URLs) and invokes them: no
# upstream answers there, and the invocation says so with its documented 502/503/504 — the
# gateway working as API.md §5 says, not a server defect. Every other 5xx still fails the run.
UPSTREAM_DOWN_IS_NOT_A_DEFECT = """
[[operations]]
include-name = "POST /api/v1/tools/{tool_id}/invoke"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]

[[operations]]
include-name = "POST /api/v1/openai/chat/completions"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]

[[operations]]
include-name = "POST /api/v1/openai/completions"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]

[[operations]]
include-name = "POST /api/v1/openai/embeddings"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]
"""


async def test_schemathesis_finds_nothing(served_database: ServedDatabase, tmp_path: Path) -> None:
    admin = await make_admin(served_database.engine)
    key = new_api_key()
    async with served_database.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO api_keys (id, user_id, name, key_prefix, key_hash, is_active, created_at)"
                " VALUES (gen_random_uuid(), :u, 'schemathesis', :p, :h, true, now())"
            ),
            {"u": admin.user_id, "p": key[:12], "h": token_digest(key)},
        )
    with hub_process(served_database.url, tmp_path) as hub:
        await wait_ready(hub)
        config = tmp_path / "schemathesis.toml"
        config.write_text(UPSTREAM_DOWN_IS_NOT_A_DEFECT, encoding="utf-8")
        cmd = [
            str(ST),
            "--config-file",
            str(config),
            "run",
            f"{hub.base_url}/openapi.json",
            "--header",
            f"X-API-Key: {key}",
            "--checks",
            CHECKS,
            # /ready answers its documented 503 when its 1 s database check is slow, which a
            # loaded 2-core machine running two suites can make it — not a defect the fuzzer
            # should fail on; it takes no input, and tests/core/test_readiness.py covers it
            "--exclude-path",
            "/ready",
            "--max-examples",
            os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8"),
            "--phases",
            os.environ.get("SCHEMATHESIS_PHASES", "examples,coverage,fuzzing"),
            # one worker: schemathesis's worker threads build ASTs at once, and CPython 3.11 before
            # 3.11.8 keeps that recursion count per interpreter, so threads can trip a spurious
            # "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905); it
            # failed this test once, with every API check passing
            "--workers",
            "1",
            "--seed",
            os.environ.get("SCHEMATHESIS_SEED", "20261126"),
            "--request-timeout",
            "20",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    # the hub's own log too: a 5xx found once under load is explained by its server-side cause
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-2000:] + "\n--- hub log:\n" + hub.log()

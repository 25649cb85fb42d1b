"""The embedded PostgreSQL used when DATABASE_URL is unset (pgserver: PostgreSQL 16 from PyPI).

Its data lives under DATA_DIR/pgdata, so a second start reuses it. pgserver reference-counts the
processes using one data directory and stops the server when the last one exits (cleanup_mode
"stop"), which also covers several uvicorn workers sharing it.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("joyhub.db")

_server: Any = None
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def start_embedded(data_dir: Path, database: str = "joyhub") -> str:
    """Start (or attach to) the embedded server; return an asyncpg URL for `database`."""
    global _server
    warnings.filterwarnings("ignore", module="platformdirs")
    import pgserver

    pgdata = (data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if not _DB_NAME.match(database):
        raise ValueError(f"not a plain database name: {database!r}")
    _server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    exists = _server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608
    if "1 row" not in exists:
        _server.psql(f'CREATE DATABASE "{database}";')
    log.info("embedded postgresql ready", extra={"pgdata": str(pgdata)})
    uri: str = _server.get_uri(database)
    return "postgresql+asyncpg://" + uri.split("://", 1)[1]


def _forget_dead_holders(server: Any) -> None:
    """Drop pids of processes that died without releasing the server (e.g. SIGKILL).

    pgserver counts holders in a pid list and stops the server only when the last one leaves;
    a holder that was killed would otherwise keep it running forever.
    """
    import json

    import psutil

    path = Path(server.pgdata) / ".handle_pids.json"
    with server._lock:
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        alive = [p for p in pids if psutil.pid_exists(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def stop_embedded() -> None:
    """Release our hold on the embedded server (it stops when no process holds it)."""
    global _server
    if _server is not None:
        try:
            _forget_dead_holders(_server)
            _server.cleanup()
        finally:
            _server = None

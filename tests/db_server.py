"""Where the test databases live: TEST_DATABASE_URL's server, or an embedded one (pgserver).

Each pytest(-xdist) worker gets a fresh database of its own, migrated once per run and dropped
at the end, so parallel runs (and CI's second run against the system server) never collide.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]


def server_url() -> str:
    """An asyncpg URL of a database on the test server that we may connect to for admin work."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+asyncpg://" + url.split("://", 1)[1]
        return url
    from joyhub.core.embedded_pg import start_embedded

    return start_embedded(ROOT / "var" / "test", database="postgres")


def fresh_database_name(worker: str) -> str:
    return f"joyhub_test_{worker}_{uuid.uuid4().hex[:8]}"


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)

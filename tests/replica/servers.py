"""A primary and its real streaming replica for the replica tests (issue 18).

Built from the system PostgreSQL 15 binaries: `initdb` a small primary in a temporary directory on
a free port, migrate it, `pg_basebackup -R` it into a replica on another free port, start both.
A copy of the shared test server itself would copy every other worker's and helper's databases,
so the primary is a fresh cluster of the same PostgreSQL; the replica is a real hot standby
streaming its WAL. When run as root the servers run as the `postgres` user (initdb refuses
root). Skipped, with the reason, when the binaries or that user are missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Cluster:
    data: Path
    port: int
    as_user: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/joyhub"

    def ctl(self, *args: str) -> None:
        log = self.data.parent / f"{self.data.name}.log"
        cmd = [*self.as_user, str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self.ctl("stop", "-m", "immediate")


@dataclass(frozen=True)
class Replicated:
    primary: Cluster
    replica: Cluster


def _missing() -> str | None:
    absent = [t for t in TOOLS if not (BIN / t).exists()]
    if absent:
        return f"PostgreSQL binaries missing in {BIN}: {', '.join(absent)}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run initdb as"
    return None


def _run(as_user: tuple[str, ...], *cmd: str) -> None:
    subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)


def replicated_clusters() -> Iterator[Replicated]:
    """Start a primary and a streaming replica; stop and remove both afterwards."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    as_user: tuple[str, ...] = ("runuser", "-u", "postgres", "--") if os.geteuid() == 0 else ()
    base = Path(tempfile.mkdtemp(prefix="joyhub-replica-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    primary = Cluster(base / "primary", free_port(), as_user)
    replica = Cluster(base / "replica", free_port(), as_user)
    try:
        initdb = (str(BIN / "initdb"), "-D", str(primary.data), "-U", "postgres", "--auth=trust", "--no-sync")
        _run(as_user, *initdb)
        settings = (
            f"port = {primary.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{base}'\n"
            "wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\nfsync = off\n"
            "full_page_writes = off\nmax_connections = 40\n"
        )
        _append(as_user, primary.data / "postgresql.conf", settings)
        primary.ctl("start")
        createdb = (str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres")
        _run(as_user, *createdb, "joyhub")
        yield Replicated(primary, replica)
    finally:
        for cluster in (replica, primary):
            if (cluster.data / "postmaster.pid").exists():
                with contextlib.suppress(subprocess.CalledProcessError):
                    cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def start_replica(pair: Replicated) -> None:
    """`pg_basebackup -R` of the primary (after it was migrated), started as a hot standby."""
    p, r = pair.primary, pair.replica
    _run(
        r.as_user,
        str(BIN / "pg_basebackup"),
        "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres", "-D", str(r.data), "-R", "-X", "stream",
        "--no-sync", "--checkpoint=fast",
    )  # fmt: skip
    _append(r.as_user, r.data / "postgresql.auto.conf", f"port = {r.port}\n")
    r.ctl("start")


def _append(as_user: tuple[str, ...], path: Path, text: str) -> None:
    subprocess.run([*as_user, "tee", "-a", str(path)], input=text.encode(), check=True, capture_output=True)

"""usage_logs partitioned by month on started_at; usage_retirements (issue 18)

The unpartitioned table is renamed aside, a partitioned `usage_logs` is created with one
partition per month from the oldest row's month to two months ahead (plus a DEFAULT partition),
the rows are copied over in batches of heap blocks (a TID range scan: sequential reads, no index
needed, progress printed to stderr after each batch), then the primary key `(id, started_at)`,
the indexes and the foreign keys are built once over the copied data (faster than maintaining
them row by row) and the old table is dropped.

The foreign key from `idempotency_keys.usage_log_id` goes: nothing may reference a row of a
table whose partitions retire whole.

The downgrade does the reverse: a plain table, filled partition by partition in the same block
batches, the old primary key `(id)`, and the foreign key back (keys naming a retired log lose
the link first).

This is a self-contained copy of the naming rule in `joyhub.usage.partitions` (a migration must
not change when the application code does).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 21:30:00+00:00
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AHEAD_MONTHS = 2
BATCH_BLOCKS = 4096  # 32 MiB of heap per batch: ~250k rows of usage_logs


def _progress(message: str) -> None:
    print(f"[0013] {message}", file=sys.stderr, flush=True)


def _add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def _start(month: date) -> str:
    return datetime(month.year, month.month, 1, tzinfo=UTC).isoformat()


def _copy_blocks(conn: Connection, source: str, target: str, columns: str, label: str) -> int:
    """INSERT INTO target SELECT … FROM source, BATCH_BLOCKS heap blocks at a time."""
    blocks = int(
        conn.execute(
            sa.text("SELECT pg_relation_size(CAST(:t AS regclass)) / current_setting('block_size')::int"),
            {"t": source},
        ).scalar_one()
    )
    copied, began = 0, time.monotonic()
    for lo in range(0, max(blocks, 1), BATCH_BLOCKS):
        hi = lo + BATCH_BLOCKS
        result = conn.execute(
            sa.text(
                f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {source} "  # noqa: S608
                f"WHERE ctid >= '({lo},0)'::tid AND ctid < '({hi},0)'::tid"
            )
        )
        copied += result.rowcount or 0
        done = min(hi, blocks)
        _progress(
            f"{label}: {copied:,} rows copied, block {done:,}/{blocks:,} "
            f"({100 * done / max(blocks, 1):.0f}%) in {time.monotonic() - began:.1f}s"
        )
    return copied


def _columns(conn: Connection, table: str) -> str:
    names = conn.execute(
        sa.text(
            "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum"
        ),
        {"t": table},
    ).scalars()
    return ", ".join(f'"{n}"' for n in names)


def _keys_and_indexes(table: str, pk: str) -> None:
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT pk_usage_logs PRIMARY KEY ({pk})")
    op.execute(f'CREATE INDEX ix_usage_logs_user_ts ON {table} (user_id, "timestamp")')
    op.execute(f"CREATE INDEX ix_usage_logs_pending ON {table} (started_at) WHERE status = 'pending'")
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT fk_usage_logs_user_id_users "
        "FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE"
    )
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT fk_usage_logs_tool_id_tools FOREIGN KEY (tool_id) REFERENCES tools (id)"
    )
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT fk_usage_logs_subscription_id_subscriptions "
        "FOREIGN KEY (subscription_id) REFERENCES subscriptions (id) ON DELETE SET NULL"
    )


def _set_aside(table: str) -> None:
    """Rename the current `usage_logs` and its index-backed names out of the way."""
    op.execute(f"ALTER TABLE usage_logs RENAME TO {table}")
    op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT pk_usage_logs TO pk_{table}")
    op.execute(f"ALTER INDEX ix_usage_logs_user_ts RENAME TO ix_{table}_user_ts")
    op.execute(f"ALTER INDEX ix_usage_logs_pending RENAME TO ix_{table}_pending")


def upgrade() -> None:
    conn = op.get_bind()
    op.execute("ALTER TABLE idempotency_keys DROP CONSTRAINT fk_idempotency_keys_usage_log_id_usage_logs")
    _set_aside("usage_logs_legacy")
    op.execute(
        "CREATE TABLE usage_logs (LIKE usage_logs_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
        "PARTITION BY RANGE (started_at)"
    )
    oldest, newest = conn.execute(
        sa.text("SELECT min(started_at), max(started_at) FROM usage_logs_legacy")
    ).one()
    this_month = datetime.now(UTC).date().replace(day=1)
    first = min(oldest.astimezone(UTC).date().replace(day=1), this_month) if oldest else this_month
    last = _add_months(this_month, AHEAD_MONTHS)
    if newest is not None:
        last = max(last, newest.astimezone(UTC).date().replace(day=1))
    month, made = first, 0
    while month <= last:
        op.execute(
            f"CREATE TABLE usage_logs_p{month:%Y%m} PARTITION OF usage_logs "
            f"FOR VALUES FROM ('{_start(month)}') TO ('{_start(_add_months(month, 1))}')"
        )
        month, made = _add_months(month, 1), made + 1
    op.execute("CREATE TABLE usage_logs_default PARTITION OF usage_logs DEFAULT")
    _progress(f"{made} monthly partitions from {first:%Y-%m} to {last:%Y-%m}, and a default")
    columns = _columns(conn, "usage_logs_legacy")
    began = time.monotonic()
    copied = _copy_blocks(conn, "usage_logs_legacy", "usage_logs", columns, "usage_logs")
    _progress(f"copied {copied:,} rows in {time.monotonic() - began:.1f}s; building keys and indexes")
    began = time.monotonic()
    _keys_and_indexes("usage_logs", "id, started_at")
    op.execute("DROP TABLE usage_logs_legacy")
    _progress(f"keys and indexes built in {time.monotonic() - began:.1f}s")
    op.create_table(
        "usage_retirements",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("archive_path", sa.String(length=1024), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("month", name=op.f("pk_usage_retirements")),
    )


def downgrade() -> None:
    conn = op.get_bind()
    op.drop_table("usage_retirements")
    _set_aside("usage_logs_partitioned")
    op.execute(
        "CREATE TABLE usage_logs (LIKE usage_logs_partitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    parts = (
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = CAST('usage_logs_partitioned' AS regclass) ORDER BY c.relname"
            )
        )
        .scalars()
        .all()
    )
    columns = _columns(conn, "usage_logs_partitioned")
    began, copied = time.monotonic(), 0
    for part in parts:
        copied += _copy_blocks(conn, part, "usage_logs", columns, part)
    _progress(f"copied {copied:,} rows in {time.monotonic() - began:.1f}s; building keys and indexes")
    op.execute("DROP TABLE usage_logs_partitioned")
    _keys_and_indexes("usage_logs", "id")
    op.execute(
        "UPDATE idempotency_keys AS k SET usage_log_id = NULL WHERE usage_log_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM usage_logs AS u WHERE u.id = k.usage_log_id)"
    )
    op.execute(
        "ALTER TABLE idempotency_keys ADD CONSTRAINT fk_idempotency_keys_usage_log_id_usage_logs "
        "FOREIGN KEY (usage_log_id) REFERENCES usage_logs (id) ON DELETE SET NULL"
    )

"""SQL for statements that take a batch of calls — or, most of the time on a quiet hub, just one.

A batched statement adds up its calls per key before it writes (an upsert may not touch one row
twice in a statement) and writes its rows in key order (so two batches cannot deadlock on rows
they share). For a batch of one call both are idle work, and not free: PostgreSQL starts every
aggregate and sort of a statement on every execution, and for the metering statements of one
call that start-up cost about a fifth of their execution (BENCHMARKS.md, "One call, one row").
`per_key` writes the one rule both ways, so a statement rendered for a lone call cannot count
differently from the same statement rendered for a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# How a total adds up the batch's rows of one key.
COUNT, SUM, MAX = "count", "sum", "max"


@dataclass(frozen=True)
class Total:
    """A column added up over a key's rows: what one row holds (`expr`; a COUNT's is `1`), how
    the rows add up (COUNT, SUM or MAX), and the column's name when the statement reads it by name."""

    expr: str
    how: str = SUM
    name: str = ""

    def over(self, *, many: bool) -> str:
        if not many:
            column = self.expr
        elif self.how == COUNT:
            column = "count(*)"
        else:
            column = f"{self.how}({self.expr})"
        return f"{column} AS {self.name}" if self.name else column


def per_key(keys: Sequence[str], totals: Sequence[Total], source: str, *, many: bool, where: str = "") -> str:
    """`SELECT keys…, totals… FROM source [WHERE where]`: one row per key with each total added up
    over the key's rows, in key order — or, for a lone row (`many=False`), that row as it is: its
    count 1, its sum and its max its own value."""
    columns = list(keys) + [total.over(many=many) for total in totals]
    sql = f"SELECT {', '.join(columns)} FROM {source}"  # noqa: S608 (names and expressions of ours)
    if where:
        sql += f" WHERE {where}"
    if many and keys:
        positions = ", ".join(str(n) for n in range(1, len(keys) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    return sql


def in_key_order(positions: int, *, many: bool) -> str:
    """` ORDER BY 1, …, positions ` for a batch; nothing for a lone row."""
    return " ORDER BY " + ", ".join(str(n) for n in range(1, positions + 1)) + " " if many else ""


def after(cte: str) -> str:
    """A condition that is always true but is only decided once every row of `cte` has been
    produced: a CTE that locks rows and carries it in its WHERE takes its locks after `cte` took
    its own, which is how the metering statements keep one lock order (keys → accounts → members
    → tool). An ARRAY sub-select reads `cte` to its end like an aggregate would, without the
    aggregate's start-up."""
    return f"ARRAY(SELECT 1 FROM {cte}) IS NOT NULL"  # noqa: S608 (a CTE name of ours)

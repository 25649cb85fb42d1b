"""`batch_sql`: the one rule for adding up a batch's rows per key, written for a batch and for a
lone row (what the rendered statements then count is checked on PostgreSQL in
`tests/tools/test_lone_call_statements.py`)."""

from __future__ import annotations

from joyhub.core.batch_sql import COUNT, MAX, SUM, Total, after, in_key_order, per_key

_TOTALS = [Total("1", COUNT, "calls"), Total("tokens", SUM), Total("rpm", MAX, "rpm")]


def test_a_batch_is_added_up_per_key_in_key_order() -> None:
    assert per_key(["a", "b"], _TOTALS, "src", many=True, where="ok") == (
        "SELECT a, b, count(*) AS calls, sum(tokens), max(rpm) AS rpm FROM src WHERE ok"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    )


def test_a_lone_row_is_taken_as_it_is() -> None:
    assert per_key(["a", "b"], _TOTALS, "src", many=False, where="ok") == (
        "SELECT a, b, 1 AS calls, tokens, rpm AS rpm FROM src WHERE ok"
    )


def test_totals_without_keys_add_up_the_whole_batch() -> None:
    assert per_key([], [Total("1", COUNT, "calls")], "d", many=True) == "SELECT count(*) AS calls FROM d"
    assert per_key([], [Total("1", COUNT, "calls")], "d", many=False) == "SELECT 1 AS calls FROM d"


def test_key_order_and_the_lock_sequence() -> None:
    assert in_key_order(3, many=True) == " ORDER BY 1, 2, 3 "
    assert in_key_order(3, many=False) == ""
    assert after("lk_key") == "ARRAY(SELECT 1 FROM lk_key) IS NOT NULL"

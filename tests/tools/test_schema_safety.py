"""Input schemas cannot burn the hub's CPU (issue 12, item 3): regexes on RE2, a linear
`uniqueItems`, a work budget per input, and big inputs validated off the event loop.

The validations that used to be catastrophic run on a daemon thread joined with a bound, so
that on code without these defences the test fails within seconds instead of hanging.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jsonschema import validators
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.clock import utcnow
from joyhub.tools.input_validation import input_errors, schema_problem
from joyhub.tools.tool_versions import ToolVersion, ToolVersions
from tests.factories import make_admin
from tests.tools.helpers import invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream

ADMIN = "/api/v1/admin/tools"
CATASTROPHIC = "^(a+)+$"
GUARD_SECONDS = 5.0


def finishes_within(seconds: float, work: Callable[[], Any]) -> tuple[Any, float]:
    """Run `work` on a daemon thread: (its result, its duration), or fail after `seconds`."""
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.perf_counter()
        out["result"] = work()
        out["elapsed"] = time.perf_counter() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still validating after {seconds} s"
    return out["result"], out["elapsed"]


def version(schema: dict[str, Any]) -> ToolVersion:
    return ToolVersions().learn(uuid.uuid4(), utcnow(), 30, json.dumps(schema))


@pytest.mark.unit
def test_a_catastrophic_pattern_costs_under_50_ms() -> None:
    """`^(a+)+$` against 30 'a' and a '!' backtracks ~2^30 steps on Python's `re`."""
    tool = version({"type": "object", "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}}})
    errors, elapsed = finishes_within(GUARD_SECONDS, lambda: tool.input_errors({"s": "a" * 30 + "!"}))
    assert elapsed < 0.05
    assert [e["field"] for e in errors] == ["body.input.s"]
    assert tool.input_errors({"s": "a" * 30}) == []


@pytest.mark.unit
@pytest.mark.parametrize(
    "schema",
    [
        # patternProperties matches the key; additionalProperties matches it again
        {
            "type": "object",
            "patternProperties": {CATASTROPHIC: {"type": "string"}},
            "additionalProperties": False,
        },
        # unevaluatedProperties re-matches patternProperties through its own walk
        {"type": "object", "patternProperties": {CATASTROPHIC: {}}, "unevaluatedProperties": False},
        # a pattern applied to every property name
        {"type": "object", "propertyNames": {"pattern": CATASTROPHIC}},
    ],
)
def test_every_keyword_that_matches_a_regex_runs_in_linear_time(schema: dict[str, Any]) -> None:
    tool = version(schema)
    errors, elapsed = finishes_within(GUARD_SECONDS, lambda: tool.input_errors({"a" * 30 + "!": "x"}))
    assert errors and elapsed < 0.05
    assert tool.input_errors({"aaaa": "x"}) == []


@pytest.mark.unit
def test_unique_items_over_mixed_items_is_linear() -> None:
    """20,000 objects and arrays cannot be sorted: jsonschema compares them pairwise (2·10^8)."""
    tool = version({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})
    items: list[Any] = [{"k": i} if i % 2 else [i, "x"] for i in range(20_000)]
    nbytes = len(json.dumps(items))
    errors, _ = finishes_within(GUARD_SECONDS, lambda: tool.input_errors({"a": items}, nbytes))
    assert errors == []
    errors, _ = finishes_within(GUARD_SECONDS, lambda: tool.input_errors({"a": [*items, {"k": 1}]}, nbytes))
    assert errors and "non-unique" in errors[0]["message"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("items", "unique"),
    [
        ([1, 1.0], False),  # JSON numbers: equal
        ([True, 1], True),  # booleans are not numbers
        ([False, 0, None, ""], True),
        ([{"a": [1, {"b": 2}]}, {"a": [1.0, {"b": 2.0}]}], False),
        ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], False),  # member order does not matter
        ([[1, 2], [2, 1]], True),  # item order does
        ([{"a": True}, {"a": 1}], True),
    ],
)
def test_unique_items_keeps_json_equality(items: list[Any], unique: bool) -> None:
    tool = version({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})
    assert (tool.input_errors({"a": items}) == []) is unique


@pytest.mark.unit
def test_an_exponential_schema_stops_at_the_work_budget() -> None:
    """Two `anyOf` branches that both descend: 2^depth evaluations without a budget."""
    node = {
        "anyOf": [
            {"type": "array", "items": {"$ref": "#/$defs/node"}, "minItems": 2},
            {"type": "array", "items": {"$ref": "#/$defs/node"}},
            {"type": "integer"},
        ]
    }
    schema = {"$defs": {"node": node}, "type": "object", "properties": {"x": {"$ref": "#/$defs/node"}}}
    assert schema_problem(schema) is None
    tool = version(schema)
    nested: Any = 1
    for _ in range(40):
        nested = [nested]
    errors, _ = finishes_within(GUARD_SECONDS, lambda: tool.input_errors({"x": nested}, 200))
    assert [e["field"] for e in errors] == ["body.input"] and "too complex" in errors[0]["message"]
    # a shallow input of the same shape is fine
    assert tool.input_errors({"x": [[1, 2], [3]]}, 50) == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"properties": {"s": {"pattern": r"(a)\1"}}}, "/properties/s/pattern"),  # backreference
        ({"properties": {"s": {"pattern": "(?=a)b"}}}, "/properties/s/pattern"),  # lookahead
        ({"patternProperties": {"(?<!x)y": {}}}, "/patternProperties"),  # lookbehind
        # reachable through a $ref into a place no keyword looks at
        (
            {"x-hidden": {"pattern": r"(\w)\1"}, "properties": {"s": {"$ref": "#/x-hidden"}}},
            "/x-hidden/pattern",
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused_when_written(schema: dict[str, Any], where: str) -> None:
    problem = schema_problem({"type": "object", **schema})
    assert problem is not None and where in problem and "RE2" in problem


async def test_admin_create_and_update_refuse_backreferences(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    admin = await make_admin(engine)
    bad = {"type": "object", "properties": {"s": {"type": "string", "pattern": r"^(\w+)\s\1$"}}}
    body = {"name": f"t-{uuid.uuid4().hex[:6]}", "description": "d", "api_endpoint": "http://127.0.0.1:9/x"}
    r = await client.post(ADMIN, json={**body, "input_schema": bad}, headers=admin.headers)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["body.input_schema"]
    assert "backreferences" in error["details"][0]["message"]
    # the catastrophic but RE2-compatible pattern is accepted (it runs in linear time)
    ok = {"type": "object", "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}}}
    r = await client.post(ADMIN, json={**body, "input_schema": ok}, headers=admin.headers)
    assert r.status_code == 201, r.text
    tool_id = r.json()["data"]["id"]
    r = await client.patch(f"{ADMIN}/{tool_id}", json={"input_schema": bad}, headers=admin.headers)
    assert (r.status_code, r.json()["error"]["details"][0]["field"]) == (422, "body.input_schema")
    r = await client.get(f"{ADMIN}/{tool_id}", headers=admin.headers)
    assert r.json()["data"]["input_schema"] == ok  # unchanged


async def test_a_catastrophic_input_is_refused_at_once_over_http(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}}}
    tool = await make_tool(engine, upstream.url("/fast"), input_schema=schema)
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool, {"s": "a" * 28 + "!"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    assert (await invoke(client, caller, tool, {"s": "aaa"})).status_code == 200
    assert upstream.total == 1


async def test_a_stored_pattern_re2_refuses_never_runs_on_python_re(
    client: httpx.AsyncClient, engine: AsyncEngine, upstream: Upstream
) -> None:
    """A schema stored before the write-time check (straight into the database here) fails
    validation instead of running its backreference on a backtracking engine."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": r"^(a+)\1$"}}}
    tool = await make_tool(engine, upstream.url("/fast"), input_schema=schema)
    caller = await make_caller(engine, "pro")
    r = await invoke(client, caller, tool, {"s": "aaaa"})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "TOOL_INPUT_INVALID")
    assert "cannot be evaluated" in r.json()["error"]["details"][0]["message"]
    assert upstream.total == 0


def _probe_version(seen: list[int]) -> ToolVersion:
    """A ToolVersion whose validator records the thread each evaluation of `x-probe` runs on."""
    from joyhub.tools.safe_validator import SafeValidator

    def probe(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        seen.append(threading.get_ident())
        return iter(())

    cls = validators.extend(SafeValidator, validators={"x-probe": probe})
    schema = {
        "type": "object",
        "x-probe": True,
        "properties": {"a": {"type": "array", "items": {"x-probe": True}}},
    }
    return ToolVersion(utcnow(), 30, cls(schema))


async def test_big_or_costly_inputs_are_validated_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    tool = _probe_version(seen)
    small = {"a": [1, 2, 3]}
    assert await tool.input_errors_async(small, len(json.dumps(small))) == []
    assert set(seen) == {loop_thread}
    seen.clear()
    big = {"a": ["x" * 100] * 1000}  # ~100 KiB
    assert await tool.input_errors_async(big, len(json.dumps(big))) == []
    assert seen and loop_thread not in seen
    seen.clear()
    costly = {"a": list(range(12_000))}  # under 64 KiB, but more work than the loop may spend
    assert await tool.input_errors_async(costly, len(json.dumps(costly))) == []
    assert seen[-1] != loop_thread


@pytest.mark.unit
def test_the_budget_grows_with_the_input() -> None:
    """A long honest input is not refused as too complex: the budget is per byte."""
    tool = version(
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "integer"},
                            "name": {"type": "string", "pattern": "^[a-z]+$"},
                        },
                        "required": ["id", "name"],
                        "additionalProperties": False,
                    },
                }
            },
        }
    )
    rows = {"rows": [{"id": i, "name": "abc"} for i in range(20_000)]}
    assert tool.input_errors(rows, len(json.dumps(rows))) == []
    assert input_errors(tool.validator, rows, 100) != []  # type: ignore[arg-type]

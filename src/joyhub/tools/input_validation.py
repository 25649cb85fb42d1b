"""Tool input schemas: checked as JSON Schema (Draft 2020-12) on write; inputs checked against them.

The gateway compiles each tool version's schema once (`tool_versions.py`) with the bounded
validator of `safe_validator.py`: regexes on RE2, a linear `uniqueItems`, and a work budget.
Only local `$ref`s (`#...`) are accepted, so validating an input can never reach the network or
fail on an unresolvable reference, and only regexes RE2 compiles (no backreferences or
lookaround), so no pattern can backtrack.

The bounds, per input: `work_budget(nbytes)` units of work (one per keyword evaluation, plus the
characters, items or members some keywords walk), i.e. 10,000 plus 2 per byte of the request
body — about 43,000 for a 16 KiB body, 2.1 million for the 1 MiB body limit. Honest inputs cost
0.25 to 1 unit per byte; a unit is 3 to 6 µs of CPU. Past the budget the input is refused
(422 TOOL_INPUT_INVALID, "too complex"). On the event loop an input gets at most
`LOOP_WORK_UNITS` (10,000, some 30 to 60 ms); more work moves to a worker thread
(`ToolVersion.input_errors_async`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator

from joyhub.core.errors import field_error
from joyhub.tools.safe_validator import BudgetExceeded, SafeValidator, UnsafePattern, metered, pattern_problem

MAX_ERRORS = 20
MESSAGE_CHARS = 300
MAX_SCHEMA_DEPTH = 64
WORK_BASE = 10_000
WORK_PER_BYTE = 2
LOOP_WORK_UNITS = 10_000
TOO_COMPLEX = "input is too complex to validate against the tool's input_schema"
# an input whose size the caller does not give is budgeted as the largest body there can be
DEFAULT_BUDGET_BYTES = 1024 * 1024


def _refs(node: Any, depth: int = 0) -> Iterator[str]:
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"input_schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield value
            yield from _refs(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value, depth + 1)


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not an acceptable input schema, or None when it is."""
    if not isinstance(schema, dict):
        return "input_schema must be a JSON object"
    try:
        for ref in _refs(schema):
            if not ref.startswith("#"):
                return f"only local references ('#...') are allowed in input_schema, not {ref[:100]!r}"
        Draft202012Validator.check_schema(schema)
        problem = pattern_problem(schema)
        if problem:
            return problem[: MESSAGE_CHARS * 2]
    except SchemaError as exc:
        return f"input_schema is not a valid JSON Schema: {exc.message[:MESSAGE_CHARS]}"
    except (ValueError, RecursionError) as exc:
        return str(exc)[:MESSAGE_CHARS] or "input_schema is not a valid JSON Schema"
    return None


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def compile_schema(schema: dict[str, Any]) -> Validator:
    """The bounded validator of a stored schema (checked by `schema_problem` when written)."""
    return SafeValidator(schema)


def work_budget(nbytes: int | None) -> int:
    """Units of validation work an input of `nbytes` bytes may cost (see the module's note)."""
    return WORK_BASE + WORK_PER_BYTE * (DEFAULT_BUDGET_BYTES if nbytes is None else max(nbytes, 0))


def input_errors(validator: Validator, value: Any, nbytes: int | None = None) -> list[dict[str, Any]]:
    """Validation errors as `details` items (`field` like "body.input.text"), at most 20.

    `nbytes` (the request body's size) sets the work budget; past it the input is refused as
    too complex. A `SafeValidator` is metered; any other validator runs unbounded.
    """
    try:
        return errors_within(validator, value, work_budget(nbytes))
    except BudgetExceeded:
        return [field_error("body.input", TOO_COMPLEX)]


def errors_within(validator: Validator, value: Any, units: int) -> list[dict[str, Any]]:
    """`input_errors` within `units` of work; raises BudgetExceeded past them."""
    details: list[dict[str, Any]] = []
    try:
        with metered(units):
            for err in validator.iter_errors(value):
                details.append(
                    field_error("body.input" + _path(err.absolute_path), err.message[:MESSAGE_CHARS])
                )
                if len(details) >= MAX_ERRORS:
                    break
    except BudgetExceeded:
        raise
    except UnsafePattern as exc:
        details.append(field_error("body.input", f"the tool's input_schema cannot be evaluated: {exc}"))
    except RecursionError:
        details.append(field_error("body.input", "input is nested too deeply to validate"))
    except Exception as exc:  # a schema feature that fails at validation time (e.g. a bad regex)
        details.append(field_error("body.input", f"input could not be validated ({type(exc).__name__})"))
    return details

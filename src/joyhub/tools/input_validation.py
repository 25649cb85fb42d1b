"""Tool input schemas: checked as JSON Schema (Draft 2020-12) on write; inputs checked against them.

The gateway compiles each tool version's schema once (`tool_versions.py`).
Only local `$ref`s (`#...`) are accepted, so validating an input can never reach the network or
fail on an unresolvable reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from joyhub.core.errors import field_error

MAX_ERRORS = 20
MESSAGE_CHARS = 300
MAX_SCHEMA_DEPTH = 64


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
    except SchemaError as exc:
        return f"input_schema is not a valid JSON Schema: {exc.message[:MESSAGE_CHARS]}"
    except (ValueError, RecursionError) as exc:
        return str(exc)[:MESSAGE_CHARS] or "input_schema is not a valid JSON Schema"
    return None


def _path(parts: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def input_errors(validator: Draft202012Validator, value: Any) -> list[dict[str, Any]]:
    """Validation errors as `details` items (`field` like "body.input.text"), at most 20."""
    details: list[dict[str, Any]] = []
    try:
        for err in validator.iter_errors(value):
            details.append(field_error("body.input" + _path(err.absolute_path), err.message[:MESSAGE_CHARS]))
            if len(details) >= MAX_ERRORS:
                break
    except RecursionError:
        details.append(field_error("body.input", "input is nested too deeply to validate"))
    except Exception as exc:  # a schema feature that fails at validation time (e.g. a bad regex)
        details.append(field_error("body.input", f"input could not be validated ({type(exc).__name__})"))
    return details

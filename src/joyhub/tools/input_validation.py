"""Tool input schemas: checked as JSON Schema (Draft 2020-12) on write, compiled once per version.

Compiled validators are cached by (tool id, updated_at): a PATCH changes `updated_at`, so the
very next invocation on every worker compiles the new schema — no stale cache to invalidate.
Only local `$ref`s (`#...`) are accepted, so validating an input can never reach the network or
fail on an unresolvable reference.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from joyhub.core.errors import field_error

CACHE_SIZE = 1024
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


class ValidatorCache:
    """A small LRU of compiled validators keyed by (tool id, updated_at)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[tuple[uuid.UUID, datetime], Draft202012Validator] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tool_id: uuid.UUID, updated_at: datetime) -> Draft202012Validator | None:
        key = (tool_id, updated_at)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, tool_id: uuid.UUID, updated_at: datetime, schema: dict[str, Any]) -> Draft202012Validator:
        validator = Draft202012Validator(schema)
        with self._lock:
            self._items[(tool_id, updated_at)] = validator
            self._items.move_to_end((tool_id, updated_at))
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return validator


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


validators = ValidatorCache()

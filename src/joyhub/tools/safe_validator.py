"""A JSON Schema (Draft 2020-12) validator whose cost is bounded, for tool input schemas.

Admins write these schemas; every caller with a key makes the hub evaluate them against inputs
of its choosing. jsonschema's own `Draft202012Validator` has three ways to burn a core on that,
closed here by extending it (`jsonschema.validators.extend`), keyword by keyword:

1. **Regular expressions run on RE2** (google-re2), a linear-time engine: `pattern`,
   `patternProperties`, and the two keywords that match patternProperties again
   (`additionalProperties`, `unevaluatedProperties`). Python's `re` backtracks: `^(a+)+$`
   against 30 `a` and a `!` takes minutes. RE2 refuses what it cannot run in linear time
   (backreferences, lookaround), so such a pattern is refused when the schema is written
   (`pattern_problem`); one stored before that check makes validation fail with `UnsafePattern`
   — it never falls back to `re`.
2. **`uniqueItems` is linear**: items are hashed in a canonical form with JSON's equality
   (`1 == 1.0`, `true != 1`, objects by their members) instead of jsonschema's pairwise
   comparison, which is quadratic whenever the items cannot be sorted (mixed types, objects).
3. **Every keyword evaluation is charged to a work budget** (`metered`): one unit per keyword,
   plus the items, members or characters that some keywords walk (`_COSTS`). Nested combinators
   can be exponential in the input's depth (`anyOf` re-validating one subtree in several
   branches, through `$ref` at every level); whatever the schema, the work stops at the budget
   with `BudgetExceeded`. `input_validation.work_budget` sizes it from the input's bytes, so
   any honest input's validation fits and no input costs more than a fixed multiple of its size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

KeywordFn = Callable[[Any, Any, Any, Any], Iterator[ValidationError] | None]
REPR_CHARS = 80  # of the instance quoted in an error message (the message is cut at 300 anyway)
PATTERN_CHARS_PER_UNIT = 256  # RE2 is linear: a long string costs a little more than a short one


class UnsafePattern(Exception):
    """A schema regex RE2 cannot compile; the message is one line for an admin."""


class BudgetExceeded(Exception):
    """Validating this input against this schema took more work than the input's budget."""


# --- the regex engine ---------------------------------------------------------------------------

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print every refused pattern on stderr
_OPTIONS.max_mem = 8 << 20  # RE2's default, stated: a pattern needing more is refused


@lru_cache(maxsize=2048)
def _compiled(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise UnsafePattern(
            f"pattern {pattern[:100]!r} is not supported: {reason} (patterns run on RE2, a"
            " linear-time engine without backreferences or lookaround)"
        ) from None


def search(pattern: str, text: str) -> bool:
    """`re.search(pattern, text) is not None`, in linear time; UnsafePattern if RE2 refuses it."""
    return _compiled(pattern).search(text) is not None


def check_pattern(pattern: str) -> None:
    """Raise UnsafePattern unless RE2 compiles `pattern`."""
    _compiled(pattern)


def _schema_patterns(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(JSON pointer, regex) of every `pattern` string and `patternProperties` key in `node`.

    Everything is walked, not only the places a schema keyword can sit: a `$ref` may point
    anywhere in the document (under `const`, `default` or an unknown keyword), which makes the
    object there a schema at validation time.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key == "pattern" and isinstance(value, str):
                yield here, value
            if key == "patternProperties" and isinstance(value, dict):
                yield from ((here, name) for name in value if isinstance(name, str))
            yield from _schema_patterns(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _schema_patterns(value, f"{where}/{index}")


def pattern_problem(schema: Any) -> str | None:
    """Why a regex of `schema` cannot be used (one line naming where it is), or None."""
    for where, pattern in _schema_patterns(schema):
        try:
            check_pattern(pattern)
        except UnsafePattern as exc:
            return f"input_schema at {where}: {exc}"
    return None


# --- the work budget ----------------------------------------------------------------------------


@dataclass
class _Budget:
    """Units left for the validation running in this context (mutable on purpose: it is spent)."""

    left: int


_BUDGET: ContextVar[_Budget | None] = ContextVar("joyhub_schema_budget", default=None)


def _charge(units: int) -> None:
    budget = _BUDGET.get()
    if budget is None:
        return  # outside `metered` (jsonschema's own checks): not an input's validation
    budget.left -= units
    if budget.left < 0:
        raise BudgetExceeded()


@contextlib.contextmanager
def metered(units: int) -> Iterator[None]:
    """Validate within `units` of work in this context (a thread or task of its own)."""
    token = _BUDGET.set(_Budget(units))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | dict) else 0


def _one(_value: Any, _instance: Any) -> int:
    return 1


_COSTS: dict[str, Callable[[Any, Any], int]] = {
    "pattern": lambda _v, instance: 1 + _size(instance) // PATTERN_CHARS_PER_UNIT,
    "patternProperties": lambda value, instance: 1 + _size(value) * _size(instance),
    "additionalProperties": lambda _v, instance: 1 + _size(instance),
    "unevaluatedProperties": lambda _v, instance: 1 + _size(instance),
    "uniqueItems": lambda _v, instance: 1 + _size(instance),
    "enum": lambda value, _i: 1 + _size(value),
    "required": lambda value, _i: 1 + _size(value),
}


def _metered(keyword: KeywordFn, cost: Callable[[Any, Any], int]) -> KeywordFn:
    def evaluate(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        _charge(cost(value, instance))
        errors = keyword(validator, value, instance, schema)
        if errors is not None:
            yield from errors

    return evaluate


# --- the keywords replaced ----------------------------------------------------------------------


def _short(instance: Any) -> str:
    text = repr(instance)
    return text if len(text) <= REPR_CHARS else text[: REPR_CHARS - 3] + "..."


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not search(pattern, instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The members neither `properties` nor `patternProperties` cover (jsonschema's rule)."""
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [
        key
        for key in instance
        if key not in properties and not any(search(pattern, key) for pattern in patterns)
    ]


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(repr(e) for e in sorted(extras)[:20])
        yield ValidationError(f"Additional properties are not allowed ({names} unexpected)")


def _evaluated_keys(validator: Any, instance: dict[str, Any], schema: Any) -> set[str]:
    """The members some keyword of `schema` evaluates (for `unevaluatedProperties`).

    jsonschema's `find_evaluated_property_keys_by_schema`, with its patternProperties match on
    RE2; each subschema it re-validates goes through the metered keywords.
    """
    if validator.is_type(schema, "boolean"):
        return set()
    _charge(1 + len(instance))
    keys: set[str] = set()
    for ref in ("$ref", "$dynamicRef"):
        if (target := schema.get(ref)) is not None:
            resolved = validator._resolver.lookup(target)
            inner = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(inner, instance, resolved.contents)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            keys |= {k for k, v in instance.items() if _valid(validator.descend(v, subschema))}
    for pattern in schema.get("patternProperties", {}):
        keys |= {k for k in instance if search(pattern, k)}
    for name, subschema in schema.get("dependentSchemas", {}).items():
        if name in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _valid(validator.descend(instance, subschema)):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys |= _evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                keys |= _evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            keys |= _evaluated_keys(validator, instance, schema["else"])
    return keys


def _valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    bad = [
        key
        for key in instance
        if key not in evaluated and not _valid(validator.descend(instance[key], unevaluated, path=key))
    ]
    if bad:
        names = ", ".join(repr(k) for k in sorted(bad)[:20])
        if unevaluated is False:
            yield ValidationError(f"Unevaluated properties are not allowed ({names} unexpected)")
        else:
            yield ValidationError(f"Unevaluated properties are not valid under the given schema ({names})")


def canonical(value: Any) -> Any:
    """A hashable form of a JSON value, equal exactly when JSON Schema calls the values equal."""
    if value is True or value is False:
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", value)  # 1 == 1.0, with equal hashes
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null",)
    if isinstance(value, list):
        return ("array", tuple(canonical(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, canonical(v)) for k, v in value.items()))
    return ("other", repr(value))


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for index, item in enumerate(instance):
        key = canonical(item)
        if key in seen:
            yield ValidationError(f"has non-unique elements (item {index} repeats an earlier one)")
            return
        seen.add(key)


_REPLACED: dict[str, KeywordFn] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
    "uniqueItems": _unique_items,
}

SafeValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    validators={
        keyword: _metered(fn, _COSTS.get(keyword, _one))
        for keyword, fn in {**Draft202012Validator.VALIDATORS, **_REPLACED}.items()
    },
)

"""Pure pieces of the gateway: token counting, Retry-After, backoff, messages, rendering."""

from __future__ import annotations

from datetime import timedelta
from email.utils import format_datetime

import pytest

from joyhub.core.clock import utcnow
from joyhub.tools import token_count, upstream
from joyhub.tools.input_validation import input_errors, schema_problem
from joyhub.tools.tool_versions import ToolVersions

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({"usage": {"total_tokens": 12}, "tokens_used": 99}, 12),
        ({"usage": {"total_tokens": 0}}, 0),
        ({"usage": {"total_tokens": -1}, "tokens_used": 5}, 5),
        ({"usage": {"total_tokens": True}, "tokens_used": 5}, 5),
        ({"usage": {"total_tokens": 3.5}, "tokens_used": 5}, 5),
        ({"usage": "many", "tokens_used": 4}, 4),
        ({"tokens_used": "4"}, None),
        ([1, 2], None),
        ("text", None),
    ],
)
def test_reported_tokens(output: object, expected: int | None) -> None:
    assert token_count.reported_tokens(output) == expected


def test_estimate_and_reservation() -> None:
    assert token_count.estimate(0, 0) == 1
    assert token_count.estimate(4, 0) == 1
    assert token_count.estimate(5, 0) == 2
    assert token_count.estimate(10, 11) == 6
    assert token_count.tokens_for({"x": 1}, 10, 11) == 6
    assert token_count.tokens_for({"usage": {"total_tokens": 0}}, 10, 11) == 0
    assert token_count.reservation(1) == 1
    assert token_count.reservation(400) == 100


def test_retry_after_parsing() -> None:
    assert upstream.parse_retry_after(None) is None
    assert upstream.parse_retry_after("") is None
    assert upstream.parse_retry_after("1.5") == 1.5
    assert upstream.parse_retry_after("120") == upstream.RETRY_AFTER_CAP_SECONDS
    assert upstream.parse_retry_after("-3") == 0.0
    assert upstream.parse_retry_after("nan") is None
    assert upstream.parse_retry_after("soon") is None
    when = format_datetime(utcnow() + timedelta(seconds=2), usegmt=True)
    parsed = upstream.parse_retry_after(when)
    assert parsed is not None and 0.5 <= parsed <= 2.0


def test_backoff_is_full_jitter_and_capped() -> None:
    assert upstream.backoff_delay(1, rand=lambda: 1.0) == pytest.approx(0.1)
    assert upstream.backoff_delay(2, rand=lambda: 1.0) == pytest.approx(0.2)
    assert upstream.backoff_delay(3, rand=lambda: 0.5) == pytest.approx(0.2)
    assert upstream.backoff_delay(10, rand=lambda: 1.0) == pytest.approx(2.0)
    assert upstream.backoff_delay(4, rand=lambda: 0.0) == 0.0


def test_error_message_extraction() -> None:
    assert upstream.error_message(b'{"message": "too long"}', 400) == "too long"
    assert upstream.error_message(b'{"error": {"message": "nested"}}', 400) == "nested"
    assert upstream.error_message(b'{"detail": "fastapi style"}', 422) == "fastapi style"
    assert upstream.error_message(b"plain\x00text\n", 400) == "plain text"
    assert upstream.error_message(b"", 418) == "The tool rejected the input (HTTP 418)"
    assert len(upstream.error_message(b"x" * 5000, 400)) == upstream.ERROR_MESSAGE_CHARS


def test_strict_json() -> None:
    assert upstream.parse_json(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    for bad in (b"NaN", b'{"a": Infinity}', b"not json", b"", b"[" * 100_000):
        with pytest.raises(ValueError):
            upstream.parse_json(bad)


def test_schema_checks() -> None:
    assert schema_problem({"type": "object"}) is None
    assert schema_problem({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}) is None
    assert schema_problem([]) == "input_schema must be a JSON object"
    assert "valid JSON Schema" in (schema_problem({"type": 12}) or "")
    assert "local references" in (schema_problem({"$ref": "http://x/y"}) or "")


def test_tool_versions_cache_and_error_paths() -> None:
    import json
    import uuid

    cache = ToolVersions(size=2)
    now = utcnow()
    ids = [uuid.uuid4() for _ in range(3)]
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    learnt = cache.learn(ids[0], now, 30, json.dumps(schema))
    assert cache.get(ids[0]) is learnt and learnt.updated_at == now and learnt.timeout_seconds == 30
    assert learnt.input_errors({"a": [1]}) == []
    # "no schema" (SQL NULL or JSON null) takes any object
    assert cache.learn(ids[1], now, 5, "null").input_errors({"a": "x"}) == []
    assert cache.learn(ids[1], now, 5, None).validator is None
    # an older version read by a slow request does not replace a newer one
    newer = cache.learn(ids[1], now + timedelta(seconds=1), 5, None)
    assert cache.learn(ids[1], now, 9, None) is newer and cache.get(ids[1]) is newer
    cache.learn(ids[2], now, 5, "{}")
    assert cache.get(ids[0]) is None  # evicted: the least recently used
    v = learnt.validator
    assert v is not None
    errors = input_errors(v, {"a": [1, "x"]})
    assert errors == [{"field": "body.input.a[1]", "message": "'x' is not of type 'integer'"}]

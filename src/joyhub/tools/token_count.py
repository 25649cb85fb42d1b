"""How many tokens an invocation costs (API.md §5, "Tokens"), and what admission reserves.

The upstream's own count wins (`usage.total_tokens`, else a top-level `tokens_used`) when it is
a non-negative integer; otherwise we estimate from the bytes that crossed the wire, a quarter
token per byte, at least 1. A reported 0 is honoured (the contract says non-negative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

BYTES_PER_TOKEN = 4

TokenSource = Literal["reported", "estimated"]


@dataclass(frozen=True)
class Charge:
    """What a call costs, and where the count came from (every usage record says, API.md §5.1);
    with the upstream's own split into prompt (input) and completion (output) tokens when it
    reported one (API.md §12: null on the record otherwise)."""

    tokens: int
    source: TokenSource
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class Reported:
    """What an upstream's `usage` said: the total billed, and its split when given."""

    total: int
    input_tokens: int | None = None
    output_tokens: int | None = None

    def charge(self) -> Charge:
        return Charge(self.total, "reported", self.input_tokens, self.output_tokens)


def _non_negative_int(value: Any) -> int | None:
    # bool is an int subclass; `true` is not a token count
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def reported_tokens(output: Any) -> int | None:
    """The upstream's own count, when it reports one we can trust."""
    found = reported_usage(output)
    return found.total if found is not None else None


def reported_usage(output: Any) -> Reported | None:
    """The upstream's own count and split: `usage.total_tokens` with OpenAI's `prompt_tokens` /
    `completion_tokens` (or `input_tokens` / `output_tokens`), else a top-level `tokens_used`."""
    if not isinstance(output, dict):
        return None
    usage = output.get("usage")
    if isinstance(usage, dict):
        total = _non_negative_int(usage.get("total_tokens"))
        if total is not None:
            return Reported(
                total,
                _first_count(usage, "prompt_tokens", "input_tokens"),
                _first_count(usage, "completion_tokens", "output_tokens"),
            )
    tokens_used = _non_negative_int(output.get("tokens_used"))
    return Reported(tokens_used) if tokens_used is not None else None


def _first_count(usage: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        found = _non_negative_int(usage.get(key))
        if found is not None:
            return found
    return None


def estimate(input_bytes: int, output_bytes: int = 0) -> int:
    """ceil((input bytes + output bytes) / 4), at least 1."""
    return max(1, -(-(input_bytes + output_bytes) // BYTES_PER_TOKEN))


def charge_for(output: Any, input_bytes: int, output_bytes: int) -> Charge:
    """The charge of a successful call: the reported count as is (0 included), else the estimate."""
    reported = reported_usage(output)
    if reported is not None:
        return reported.charge()
    return Charge(estimate(input_bytes, output_bytes), "estimated")


def tokens_for(output: Any, input_bytes: int, output_bytes: int) -> int:
    return charge_for(output, input_bytes, output_bytes).tokens


def reservation(input_bytes: int) -> int:
    """What admission holds back while the call runs: the estimate from the input alone."""
    return estimate(input_bytes)

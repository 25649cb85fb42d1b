"""The password policy of API.md §2, with every unmet rule named, and the common-password check.

The policy runs in the service (not in the Pydantic model) so that one 422 can name *every*
unmet rule, each as `{"field", "message", "rule"}`. The breached-password list is Django's
20,000-entry list shipped in `auth/data/` (see its NOTICE); it is read once, lazily, and kept
in memory as a frozenset (~1.5 MB). Nothing is downloaded at run time.

A password is "common" when its lower-cased form is in the list, or when that form with
trailing digits and symbols stripped is (`Password1!`, `Welcome123!`): the usual way people
"comply" with a complexity rule adds nothing an attacker's wordlist does not try first.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from joyhub.core.errors import ValidationFailed, field_error

MIN_LENGTH = 8
MAX_LENGTH = 128
COMMON_PASSWORDS_FILE = "common-passwords.txt.gz"


@dataclass(frozen=True)
class PolicyViolation:
    rule: str
    message: str


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The bundled breached-password list, lower-cased (loaded on first use, then cached)."""
    data = resources.files("joyhub.auth").joinpath("data", COMMON_PASSWORDS_FILE).read_bytes()
    text = gzip.decompress(data).decode("utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def _core(password_lower: str) -> str:
    """The password without its trailing digits and symbols (`password1!` -> `password`)."""
    end = len(password_lower)
    while end > 0 and not password_lower[end - 1].isalpha():
        end -= 1
    return password_lower[:end]


def is_common(password: str) -> bool:
    lowered = password.lower()
    listed = common_passwords()
    if lowered in listed:
        return True
    core = _core(lowered)
    return bool(core) and core in listed


def _is_symbol(char: str) -> bool:
    # "one other character": anything that is neither a cased letter nor a digit
    return not (char.islower() or char.isupper() or char.isdigit())


def violations(password: str) -> list[PolicyViolation]:
    """Every rule of the policy that `password` breaks (empty when it is acceptable)."""
    problems: list[PolicyViolation] = []
    if len(password) < MIN_LENGTH:
        problems.append(PolicyViolation("min_length", f"Must be at least {MIN_LENGTH} characters long"))
    if len(password) > MAX_LENGTH:
        problems.append(PolicyViolation("max_length", f"Must be at most {MAX_LENGTH} characters long"))
    if not any(c.islower() for c in password):
        problems.append(PolicyViolation("lowercase", "Must contain a lower-case letter"))
    if not any(c.isupper() for c in password):
        problems.append(PolicyViolation("uppercase", "Must contain an upper-case letter"))
    if not any(c.isdigit() for c in password):
        problems.append(PolicyViolation("digit", "Must contain a digit"))
    if not any(_is_symbol(c) for c in password):
        problems.append(PolicyViolation("symbol", "Must contain a character that is not a letter or a digit"))
    if len(password) <= MAX_LENGTH and is_common(password):
        problems.append(
            PolicyViolation("common", "This password is too common (it appears in breached-password lists)")
        )
    return problems


def violation_details(password: str, field: str) -> list[dict[str, Any]]:
    return [{**field_error(field, v.message), "rule": v.rule} for v in violations(password)]


def enforce_policy(password: str, field: str = "body.password") -> None:
    """Raise 422 VALIDATION_ERROR naming every unmet rule, or return when the password is fine."""
    details = violation_details(password, field)
    if details:
        raise ValidationFailed("Password does not meet the password policy", details=details)

"""The password policy and the bundled common-password list, without the database."""

from __future__ import annotations

import pytest

from joyhub.auth import passwords
from joyhub.core.errors import ValidationFailed

pytestmark = pytest.mark.unit


def _rules(password: str) -> set[str]:
    return {v.rule for v in passwords.violations(password)}


def test_bundled_list_is_loaded_once_and_big() -> None:
    listed = passwords.common_passwords()
    assert len(listed) > 19_000
    assert {"password", "qwerty", "123456", "welcome"} <= listed
    assert passwords.common_passwords() is listed


@pytest.mark.parametrize(
    "password",
    ["Password1!", "Welcome123!", "PASSWORD", "Qwerty123!!", "Dragon2024#", "Iloveyou1."],
)
def test_common_passwords_and_decorated_ones(password: str) -> None:
    assert passwords.is_common(password)


@pytest.mark.parametrize("password", ["Tr1cky-Quokka-Lantern", "Zq7#mK2p", "Emoji-🦄-Pass-9"])
def test_uncommon_passwords(password: str) -> None:
    assert not passwords.is_common(password)
    assert passwords.violations(password) == []


def test_every_rule_is_named() -> None:
    assert _rules("") == {"min_length", "lowercase", "uppercase", "digit", "symbol"}
    assert _rules("a" * 200) == {"max_length", "uppercase", "digit", "symbol"}
    assert _rules("Aa1!aaaa") == set()
    assert _rules("Aa1!aaa") == {"min_length"}


def test_unicode_classes() -> None:
    # cased letters from any script count; an uncased letter (CJK) counts as "other"
    assert _rules("ÄÖÜäöü12") == {"symbol"}
    assert _rules("Ab1漢字漢字漢") == set()


def test_enforce_policy_details() -> None:
    with pytest.raises(ValidationFailed) as info:
        passwords.enforce_policy("short", "body.new_password")
    details = info.value.details
    assert all(d["field"] == "body.new_password" and d["message"] for d in details)
    assert {d["rule"] for d in details} == {"min_length", "uppercase", "digit", "symbol"}
    passwords.enforce_policy("Tr1cky-Quokka-Lantern")


def test_data_file_ships_inside_the_package() -> None:
    from importlib import resources

    data = resources.files("joyhub.auth").joinpath("data")
    assert data.joinpath("common-passwords.txt.gz").is_file()
    assert (
        "BSD" in data.joinpath("NOTICE").read_text()
        or "Redistribution" in data.joinpath("NOTICE").read_text()
    )

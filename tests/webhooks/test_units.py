"""Pure pieces of the webhook machinery: signatures, sealed secrets, the schedule, timestamps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook

from joyhub.webhooks import attempt, policy, signing
from joyhub.webhooks.secret_box import SecretBox, SecretUnreadable, new_secret

pytestmark = pytest.mark.unit


def test_signatures_match_the_standard_webhooks_reference() -> None:
    shown, raw = new_secret()
    body = attempt.payload("evt_1", "webhook.test", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), '{"a": 1}')
    assert (
        body
        == b'{"id": "evt_1", "type": "webhook.test", "created_at": "2030-01-02T03:04:05Z", "data": {"a": 1}}'
    )
    now = int(datetime.now(UTC).timestamp())
    reference = Webhook(shown).sign("evt_1", datetime.fromtimestamp(now, UTC), body)
    assert signing.signature(raw, "evt_1", now, body) == reference
    headers = signing.headers("evt_1", now, body, [raw, new_secret()[1]])
    assert headers["webhook-signature"].split(" ")[0] == reference
    assert Webhook(shown).verify(body, headers)["data"] == {"a": 1}


def test_sealed_secrets_open_only_under_their_key_and_endpoint() -> None:
    box = SecretBox("server-secret-one-that-is-long-enough-0123456789")
    endpoint = uuid.uuid4()
    _, raw = new_secret()
    sealed = box.seal(endpoint, raw)
    assert raw not in sealed and box.seal(endpoint, raw) != sealed  # a fresh nonce every time
    assert box.open(endpoint, sealed) == raw
    with pytest.raises(SecretUnreadable):
        box.open(uuid.uuid4(), sealed)  # copied onto another endpoint's row
    with pytest.raises(SecretUnreadable):
        SecretBox("another-server-secret-long-enough-0123456789").open(endpoint, sealed)
    with pytest.raises(SecretUnreadable):
        box.open(endpoint, b"\x02" + sealed[1:])


def test_the_retry_schedule() -> None:
    assert policy.MAX_ATTEMPTS == 8
    expected = [5, 300, 1800, 7200, 18000, 36000, 36000]
    for attempts, seconds in enumerate(expected, start=1):
        delay = policy.next_attempt_delay(attempts)
        assert delay is not None
        assert seconds * 0.9 <= delay.total_seconds() <= seconds * 1.1
    assert policy.next_attempt_delay(8) is None
    assert sum(expected, 0) / 3600 == pytest.approx(27.6, abs=0.1)  # "about 28 hours" in all
    assert timedelta(seconds=policy.ATTEMPT_TIMEOUT_SECONDS) < policy.CLAIM_LEASE


@pytest.mark.parametrize("code", [301, 302, 307, 308, 400, 404, 410, 500, 503])
def test_anything_but_2xx_is_a_failed_attempt(code: int) -> None:
    result = attempt._by_status(code)
    assert not result.ok and result.status_code == code

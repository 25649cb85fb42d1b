"""/metrics behind METRICS_TOKEN (issue 12, lower list)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from joyhub.core.config import ConfigError, load_settings

pytestmark = pytest.mark.integration

TOKEN = "metrics-" + "s3cr3t" * 4


async def test_metrics_answer_only_the_token_bearer(make_client: Callable[..., Any]) -> None:
    c: httpx.AsyncClient = await make_client(metrics_token=TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
    ):
        r = await c.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "NOT_AUTHENTICATED"
        assert "joyhub_http_requests_total" not in r.text
    r = await c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "joyhub_http_requests_total" in r.text
    assert r.headers["cache-control"] == "no-store"


async def test_without_a_token_metrics_stay_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 200


def test_a_weak_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", "short")
    with pytest.raises(ConfigError, match="METRICS_TOKEN"):
        load_settings(_env_file=None)
    monkeypatch.setenv("METRICS_TOKEN", "")
    assert load_settings(_env_file=None).metrics_token is None

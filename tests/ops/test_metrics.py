"""`/metrics`: Prometheus text with route templates as labels, never user ids."""

from __future__ import annotations

import uuid

import httpx
import pytest

pytestmark = pytest.mark.integration


async def test_metrics_exposition_uses_route_templates(client: httpx.AsyncClient) -> None:
    await client.get("/health")
    probe = uuid.uuid4()
    await client.get(f"/api/v1/tools/{probe}")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'joyhub_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert "joyhub_http_request_duration_seconds_bucket" in text
    assert "joyhub_db_pool_connections_in_use" in text
    # a path parameter never becomes a label value
    assert "/api/v1/tools/{tool_id}" in text or 'route="unmatched"' in text
    assert str(probe) not in text

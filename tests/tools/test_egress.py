"""The egress policy (issue 12, item 6): no SSRF through tool endpoints, at creation or at
connect time, whatever the address form and however DNS answers.

Nothing here resolves real names or connects outside loopback: resolvers are injected, and the
public addresses below are only ever *checked*, never connected to.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from typing import Any

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from sqlalchemy.ext.asyncio import AsyncEngine

from joyhub.core.config import ConfigError, load_settings
from joyhub.core.egress import EgressDenied, EgressPolicy
from joyhub.tools import upstream as gateway_upstream
from joyhub.tools.transport import AiohttpTransport
from tests.conftest import test_settings as hub_settings
from tests.factories import make_admin
from tests.tools.helpers import invoke, make_caller, make_tool
from tests.tools.upstream_server import Upstream

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:4700:4700::1111"
ADMIN = "/api/v1/admin/tools"


class ScriptedResolver(AbstractResolver):
    """Answers each lookup with the next list of addresses (the last one repeats)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        addresses = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if not addresses:
            raise OSError("no such host")
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in addresses
        ]

    async def close(self) -> None:
        return None


def enforcing(*allowed: str, resolver: AbstractResolver | None = None) -> EgressPolicy:
    return EgressPolicy(
        enforce=True, allowed=tuple(ip_network(n) for n in allowed), resolver=resolver or ScriptedResolver([])
    )


REFUSED_URLS = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://[::1]:8080/",
    "http://2130706433/",  # decimal 127.0.0.1
    "http://0177.0.0.1/",  # octal
    "http://0x7f.0.0.1/",  # hex
    "http://0x7f000001/",
    "http://127.1/",  # short form
    "http://0.0.0.0:5432/",
    "http://0/",
    "http://localhost:5432/",
    "http://LOCALHOST./",
    "http://db.localhost/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/",  # mapped metadata address, hex form
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[2002:a9fe:a9fe::1]/",  # 6to4 of it
    "http://[::]/",
    "http://[fe80::1%25eth0]/",  # link-local with a zone
    "http://[fc00::1]/",  # unique local
    "http://[ff02::1]/",  # multicast
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://255.255.255.255/",
    "http://198.51.100.7/",  # documentation
    "http://999.1.1.1/",  # looks numeric, is no address
    "ftp://example.com/",
    "file:///etc/passwd",
]


@pytest.mark.unit
@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_every_internal_address_form_is_refused(url: str) -> None:
    with pytest.raises(EgressDenied) as info:
        await enforcing().check_url(url)
    assert "\n" not in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    "url", [f"https://{PUBLIC_V4}/v1", f"https://[{PUBLIC_V6}]:8443/", "https://1572395790/"]
)
async def test_public_literal_addresses_pass(url: str) -> None:
    await enforcing().check_url(url)  # 1572395790 is 93.184.215.14 in decimal


@pytest.mark.unit
async def test_names_are_judged_by_every_address_they_resolve_to() -> None:
    await enforcing(resolver=ScriptedResolver([PUBLIC_V4, PUBLIC_V6])).check_url("https://tool.example/")
    for answer in ([PUBLIC_V4, "10.1.2.3"], ["127.0.0.1"], ["::1"], ["::ffff:169.254.169.254"], []):
        with pytest.raises(EgressDenied):
            await enforcing(resolver=ScriptedResolver(answer)).check_url("https://tool.example/")


@pytest.mark.unit
async def test_allowed_networks_open_private_ranges() -> None:
    policy = enforcing("10.0.0.0/8", "fd00::/8", resolver=ScriptedResolver(["10.9.8.7"]))
    await policy.check_url("http://10.1.2.3/")
    await policy.check_url("http://[::ffff:10.1.2.3]/")
    await policy.check_url("http://[fd12::1]/")
    await policy.check_url("http://internal.tool/")
    with pytest.raises(EgressDenied):
        await policy.check_url("http://192.168.0.1/")


@pytest.mark.unit
async def test_development_does_not_enforce() -> None:
    policy = EgressPolicy.from_settings(hub_settings(environment="development"))
    assert policy.enforce is False
    for url in ("http://localhost:5432/", "http://127.0.0.1/", "http://169.254.169.254/"):
        await policy.check_url(url)
    with pytest.raises(EgressDenied):
        await policy.check_url("gopher://localhost/")  # the scheme is checked everywhere
    policy.check_address(ip_address("127.0.0.1"))


@pytest.mark.unit
def test_settings_parse_and_refuse_bad_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = EgressPolicy.from_settings(
        hub_settings(
            environment="production", email_backend="smtp", tool_allowed_networks=" 10.0.0.0/8, fd00::/8 "
        )
    )
    assert policy.enforce and [str(n) for n in policy.allowed] == ["10.0.0.0/8", "fd00::/8"]
    monkeypatch.setenv("TOOL_ALLOWED_NETWORKS", "10.0.0.1/8")
    with pytest.raises(ConfigError, match="TOOL_ALLOWED_NETWORKS"):
        load_settings(_env_file=None)


class _Hooks:
    async def failed(self) -> bool:
        return False

    async def may_retry(self) -> bool:
        return True


async def _call(policy: EgressPolicy, url: str) -> gateway_upstream.UpstreamResult:
    transport = AiohttpTransport(max_connections=4, keepalive_seconds=5, egress=policy)
    try:
        target = gateway_upstream.Target(url, 5, 2)
        return await gateway_upstream.call(transport, target, b"{}", "rid", _Hooks(), sleep=_no_wait)
    finally:
        await transport.aclose()


async def _no_wait(_: float) -> None:
    return None


async def test_connect_time_refuses_a_literal_loopback_address(upstream: Upstream) -> None:
    res = await _call(enforcing(), upstream.url("/fast"))
    assert res.outcome == "unavailable" and "ConnectError" in res.message
    assert upstream.total == 0
    # the same call with loopback allowed goes through (the refusal was the policy's)
    assert (await _call(enforcing("127.0.0.0/8"), upstream.url("/fast"))).outcome == "success"
    assert upstream.total == 1


async def test_dns_rebinding_cannot_reach_loopback(upstream: Upstream) -> None:
    """The name resolves to a public address when the tool is written, to 127.0.0.1 when it is
    called: the creation check passes, the connection is refused, nothing reaches loopback."""
    resolver = ScriptedResolver([PUBLIC_V4], ["127.0.0.1"])
    policy = enforcing(resolver=resolver)
    url = f"http://rebind.example:{upstream.port}/fast"
    await policy.check_url(url)
    res = await _call(policy, url)
    assert res.outcome == "unavailable"
    assert upstream.total == 0
    assert resolver.lookups[0] == "rebind.example" and len(resolver.lookups) >= 2


async def test_a_name_with_refused_and_allowed_answers_connects_only_to_allowed_ones(
    upstream: Upstream,
) -> None:
    """Connect-time answers are filtered: 127.0.0.2 (refused here) next to 127.0.0.1 (allowed)
    is never connected to, although it is listed first."""
    import asyncio

    accepted: list[str] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append("127.0.0.2")
        writer.close()

    decoy = await asyncio.start_server(count, "127.0.0.2", upstream.port)
    try:
        policy = enforcing("127.0.0.1/32", resolver=ScriptedResolver(["127.0.0.2", "127.0.0.1"]))
        res = await _call(policy, f"http://mixed.example:{upstream.port}/fast")
    finally:
        decoy.close()
        await decoy.wait_closed()
    assert res.outcome == "success"
    assert upstream.total == 1 and accepted == []


def _production(**overrides: Any) -> dict[str, Any]:
    return {"environment": "production", "email_backend": "smtp", **overrides}


async def test_production_invocation_of_an_internal_endpoint_is_refused(
    make_client: Callable[..., Any], engine: AsyncEngine, upstream: Upstream
) -> None:
    """A tool already pointing at a loopback service (written before the policy, or through the
    database): the call answers 503 TOOL_UNAVAILABLE and the service sees nothing."""
    prod: httpx.AsyncClient = await make_client(**_production())
    tool = await make_tool(engine, upstream.url("/fast"), max_attempts=1)
    caller = await make_caller(engine, "pro")
    r = await invoke(prod, caller, tool)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "TOOL_UNAVAILABLE")
    assert upstream.total == 0
    # the operator's allow-list opens it
    allowed: httpx.AsyncClient = await make_client(**_production(tool_allowed_networks="127.0.0.0/8"))
    assert (await invoke(allowed, caller, tool)).status_code == 200
    assert upstream.total == 1


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/",
        "https://2130706433/",
        "https://0.0.0.0/",
        "https://localhost:5432/",
        "https://[::ffff:127.0.0.1]/",
    ],
)
async def test_production_refuses_internal_endpoints_at_create_and_update(
    make_client: Callable[..., Any], engine: AsyncEngine, endpoint: str
) -> None:
    prod: httpx.AsyncClient = await make_client(**_production(tool_allowed_networks="198.51.100.0/24"))
    admin = await make_admin(engine)
    body = {"name": f"t-{uuid.uuid4().hex[:6]}", "description": "d", "api_endpoint": endpoint}
    r = await prod.post(ADMIN, json=body, headers=admin.headers)
    assert r.status_code == 422, r.text
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "body.api_endpoint" and "not allowed" in detail["message"]
    r = await prod.post(
        ADMIN, json={**body, "api_endpoint": "https://198.51.100.7/run"}, headers=admin.headers
    )
    assert r.status_code == 201, r.text
    tool_id = r.json()["data"]["id"]
    r = await prod.patch(f"{ADMIN}/{tool_id}", json={"api_endpoint": endpoint}, headers=admin.headers)
    assert (r.status_code, r.json()["error"]["details"][0]["field"]) == (422, "body.api_endpoint")

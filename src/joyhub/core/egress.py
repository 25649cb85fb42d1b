"""Where the hub may connect on someone's behalf: the egress policy of tool and webhook endpoints.

The threat (SSRF): an endpoint URL — a tool's, set by an admin, or a webhook's, set by a user —
that points into the hub's own network: the cloud metadata service (169.254.169.254), a database
on localhost:5432, Redis, any private address. Every call would then carry the hub's network
position to whoever chose the URL, and a tool call hands the answer back to the caller.

In production (`enforce`), an address is refused unless it is a public unicast address — so
loopback, private (RFC 1918, ULA), link-local, carrier-grade NAT, multicast, reserved,
unspecified (0.0.0.0, ::) and documentation ranges are refused — or it lies inside
`TOOL_ALLOWED_NETWORKS` (an operator's CIDR list, e.g. the VPC of in-house tools). IPv6 forms
that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4, Teredo)
are judged by that IPv4 address as well. In development and test nothing is refused: the demo
tools and the test upstreams are local.

Two checks, one rule (`check_address`):

- `check_url`, when an endpoint is written: the scheme, `localhost` names, literal addresses in
  every form a resolver accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `[::1]`,
  `[::ffff:127.0.0.1]`), and every address the host name resolves to now.
- `connector()`, at connect time: a TCPConnector whose resolver checks each address it returns
  and whose socket factory refuses to create a socket for an address the policy refuses. The
  socket factory sees the very address about to be connected to — resolved or literal, cached
  or fresh — so a DNS answer that changed since the URL was written (rebinding) cannot slip
  through. A refusal fails the connection like an unreachable host (OSError → aiohttp's
  ClientConnectorError → httpx.ConnectError in `tools/transport.py`), so a tool call answers
  503 TOOL_UNAVAILABLE without a byte sent.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from joyhub.core.config import Settings

log = logging.getLogger("joyhub.egress")

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
NAT64 = (IPv6Network("64:ff9b::/96"), IPv6Network("64:ff9b:1::/48"))
# what a resolver (inet_aton) takes as an IPv4 address: 1 to 4 decimal, octal or hex parts
_LEGACY_IPV4 = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


class EgressDenied(Exception):
    """The policy refuses this URL or address; the message is one line, safe to show an admin."""


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, Teredo client), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in NAT64):
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is."""
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not publicly routable"),
    )
    return next((name for refused, name in checks if refused), None)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host denotes literally (any form a resolver accepts), else None.

    Raises EgressDenied for a host that looks like a legacy IPv4 form but is not a valid one.
    """
    try:
        return ip_address(host.split("%", 1)[0])  # an IPv6 zone id does not change the address
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            raise EgressDenied(f"{host[:100]!r} is not a valid IPv4 address") from None
    return None


@dataclass(frozen=True)
class EgressPolicy:
    enforce: bool  # True when ENVIRONMENT=production
    allowed: tuple[IPNetwork, ...] = ()  # TOOL_ALLOWED_NETWORKS
    # how host names are resolved (None: the system resolver); tests inject a rebinding one
    resolver: AbstractResolver | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        return cls(enforce=settings.environment == "production", allowed=settings.allowed_networks)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why the policy refuses `ip` (one line), or None when it may be reached."""
        if not self.enforce:
            return None
        embedded = _embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
        candidates = [ip] if embedded is None else [ip, embedded]
        if any(c in net for c in candidates for net in self.allowed if c.version == net.version):
            return None
        for candidate in candidates:
            kind = _kind(candidate)
            if kind is not None:
                return f"{ip} is a {kind} address (outside TOOL_ALLOWED_NETWORKS)"
        return None

    def check_address(self, ip: IPv4Address | IPv6Address) -> None:
        """Raise EgressDenied when the policy refuses `ip`."""
        reason = self.refusal(ip)
        if reason is not None:
            raise EgressDenied(reason)

    async def check_url(self, url: str) -> None:
        """Raise EgressDenied unless `url` is http(s) and every address its host stands for is
        allowed now (literal forms are read as a resolver would; names are resolved)."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise EgressDenied("not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise EgressDenied("only http:// and https:// URLs may be called")
        if not host:
            raise EgressDenied("the URL names no host")
        if not self.enforce:
            return
        if host == "localhost" or host.endswith(".localhost"):
            raise EgressDenied(f"{host[:100]!r} is a loopback name")
        literal = literal_address(host)
        if literal is not None:
            self.check_address(literal)
            return
        for ip in await self._resolve(host, port):
            self.check_address(ip)

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        resolver = self.resolver or aiohttp.ThreadedResolver()
        try:
            answers = await resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except (OSError, ValueError) as exc:
            raise EgressDenied(f"{host[:100]!r} could not be resolved ({type(exc).__name__})") from None
        finally:
            if self.resolver is None:
                await resolver.close()
        if not answers:
            raise EgressDenied(f"{host[:100]!r} could not be resolved")
        return [ip_address(answer["host"]) for answer in answers]

    def connector(self, **tcp_connector_kwargs: Any) -> aiohttp.TCPConnector:
        """A TCPConnector that connects only to addresses this policy allows (see the module)."""
        inner = self.resolver or aiohttp.ThreadedResolver()
        return aiohttp.TCPConnector(
            resolver=_CheckedResolver(self, inner),
            socket_factory=self._socket,
            **tcp_connector_kwargs,
        )

    def _socket(self, addr_info: Any) -> socket.socket:
        """aiohttp's socket factory: the last word on the address about to be connected to."""
        family, type_, proto, _, sockaddr = addr_info
        reason = self.refusal(ip_address(sockaddr[0]))
        if reason is not None:
            log.warning("egress refused", extra={"address": str(sockaddr[0]), "reason": reason})
            raise OSError(errno.EACCES, f"egress refused: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)


class _CheckedResolver(AbstractResolver):
    """Resolves with `inner`, keeping only the addresses the policy allows."""

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        allowed = [a for a in answers if self._policy.refusal(ip_address(a["host"])) is None]
        if not allowed:
            reasons = {self._policy.refusal(ip_address(a["host"])) for a in answers}
            log.warning(
                "egress refused", extra={"host": host, "reason": "; ".join(sorted(map(str, reasons)))}
            )
            raise OSError(errno.EACCES, f"egress to {host} refused: every address it resolves to is refused")
        return allowed

    async def close(self) -> None:
        await self._inner.close()

"""Where outgoing requests to user-supplied URLs may go (tool endpoints, webhook endpoints).

In production (`ENVIRONMENT=production`) a URL must reach a public address, unless its network
is listed in TOOL_ALLOWED_NETWORKS (API.md §9): a webhook URL must not become a way to probe or
call the hub's own private network (SSRF). Outside production everything is allowed, so
development and tests can use loopback receivers.

Two checks, because DNS can change between them: `check_url` when a URL is saved (its literal
address, or what its host resolves to now), and `connector()`'s socket factory at every connect,
on the address actually dialled.

This is the webhook branch's minimal implementation of the shared interface; the gateway's
fuller one replaces it at merge, so nothing outside this interface may be relied on.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from joyhub.core.config import Settings

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class EgressDenied(Exception):
    """The destination is not allowed; the message is one line naming why."""


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """TOOL_ALLOWED_NETWORKS: comma-separated CIDRs (ValueError names a bad one)."""
    nets = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            nets.append(ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR network") from None
    return tuple(nets)


@dataclass(frozen=True)
class EgressPolicy:
    enforce: bool
    allowed: tuple[IPNetwork, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        return cls(
            enforce=settings.environment == "production",
            allowed=parse_networks(settings.tool_allowed_networks),
        )

    def check_address(self, ip: IPAddress) -> None:
        if not self.enforce:
            return
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return
        if not ip.is_global:
            raise EgressDenied(f"{ip} is not a public address")

    async def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise EgressDenied("the URL names no host")
        try:
            literal = ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(literal)
            return
        if not self.enforce:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
            )
        except OSError:
            raise EgressDenied(f"the host {host!r} does not resolve") from None
        for info in infos:
            self.check_address(ip_address(info[4][0]))

    def connector(self, **tcp_connector_kwargs: Any) -> aiohttp.TCPConnector:
        """An aiohttp connector that checks every address it dials, at connect time."""
        return aiohttp.TCPConnector(socket_factory=self._socket, **tcp_connector_kwargs)

    def _socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        try:
            self.check_address(ip_address(sockaddr[0]))
        except EgressDenied as exc:
            # an OSError, so the connector tries the host's next address, then reports a
            # connection failure naming the reason
            raise OSError(errno.EACCES, f"egress denied: {exc}") from None
        return socket.socket(family=family, type=type_, proto=proto)

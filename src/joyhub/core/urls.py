"""The shape of a URL the hub will call: tool endpoints and webhook endpoints alike."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_http_url(url: str) -> str:
    """An absolute http(s) URL with a host, no credentials and no fragment (ValueError if not).

    Credentials in a URL would be stored and shown in clear; tools have a secret header for
    that, and webhook receivers verify the signature instead.
    """
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must be a URL without spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username or parts.password:
        raise ValueError("must not embed credentials")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.fragment:
        raise ValueError("must not have a fragment")
    return url

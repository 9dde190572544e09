"""Secrets out of what is printed: URLs that carry credentials (`nats://user:pass@host`,
`nats://token@host`) keep their user name and lose the rest of their user info.
Every log line, RPC reply, exception and banner that shows a URL passes it through
`redact_url`."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(urls: str) -> str:
    """`urls` (one URL or several, comma-separated) with passwords and tokens masked."""
    return ",".join(_redact_one(url) for url in urls.split(","))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # not a URL we can take apart: show nothing of it
        return MASK
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, _ = userinfo.partition(":")
    shown = f"{user}:{MASK}" if has_password else MASK  # a lone user info is a token
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def host_port(url: object) -> str:
    """host:port of a parsed URL (a `urllib.parse` result or nats' `connected_url`),
    without any user info."""
    hostname = getattr(url, "hostname", None) or "?"
    port = getattr(url, "port", None)
    return f"{hostname}:{port}" if port else str(hostname)

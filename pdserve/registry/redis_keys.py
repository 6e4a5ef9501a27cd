"""The Redis side both ends agree on: which URLs name a registry, and where an instance's entry lives.

pdserve:member:<instance url>  ->  Member JSON, expiring after the instance's --registry-ttl
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

KEY_PREFIX = "pdserve:member:"
MAX_MEMBERS = 1024  # a router follows at most this many entries (more are ignored, and logged)
IO_TIMEOUT_S = 2.0  # one Redis call; a registry that answers slower counts as down


def check_registry_url(url: str) -> str:
    """`url` if it is redis://HOST:PORT[/DB] (or rediss://); ValueError with the reason otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"--registry must be redis://HOST:PORT[/DB], got {redact(url)!r}") from None
    db = parts.path.strip("/")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or (db and not db.isdigit()):
        raise ValueError(f"--registry must be redis://HOST:PORT[/DB], got {redact(url)!r}")
    return url


def redact(url: str) -> str:
    """`url` without its password (redis://:PASSWORD@host), for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def member_key(url: str) -> str:
    return KEY_PREFIX + url


def connect(url: str) -> Any:
    """An asyncio Redis client for `url`, with short timeouts and no retries of its own (callers back
    off and say so)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(
        check_registry_url(url),
        socket_timeout=IO_TIMEOUT_S,
        socket_connect_timeout=IO_TIMEOUT_S,
        retry_on_timeout=False,
        retry=None,
    )

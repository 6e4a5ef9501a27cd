"""One instance as the registry knows it: role, model, HTTP URL, KV control address, TP, load.

An entry comes from Redis, which any process of the cluster (or anyone who reaches Redis) can write,
so `Member.parse` takes bytes and either returns a well-formed Member or raises `MalformedMember`:
bounded size, known role, an http(s) URL with a host and a port, bounded strings and counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import urlsplit

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")
MAX_ENTRY_BYTES = 4096
MAX_TEXT = 512
MAX_TP = 4096
MAX_LOAD_KEYS = 32


class MalformedMember(ValueError):
    """A registry entry that is not a valid Member; the reader ignores it."""


@dataclass(frozen=True)
class Member:
    """One registered instance. `url` is how peers and routers reach its HTTP front."""

    role: Role
    url: str
    model: str | None = None
    kv_addr: str | None = None
    tp: int = 1
    load: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"role": self.role, "url": self.url, "model": self.model, "kv_addr": self.kv_addr}
        return json.dumps({**body, "tp": self.tp, "load": self.load}).encode()

    @classmethod
    def parse(cls, raw: bytes | str) -> Member:
        if len(raw) > MAX_ENTRY_BYTES:
            raise MalformedMember(f"entry of {len(raw)} bytes (at most {MAX_ENTRY_BYTES})")
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise MalformedMember(f"entry is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise MalformedMember("entry is not a JSON object")
        if obj.get("role") not in ROLES:
            raise MalformedMember(f"entry has no valid role: {str(obj.get('role'))[:40]!r}")
        tp = obj.get("tp", 1)
        if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= MAX_TP:
            raise MalformedMember(f"entry has an invalid tp: {str(tp)[:40]!r}")
        return cls(
            role=cast(Role, obj["role"]),
            url=check_url(obj.get("url")),
            model=_text(obj, "model"),
            kv_addr=_text(obj, "kv_addr"),
            tp=tp,
            load=_load(obj.get("load")),
        )


def check_url(url: Any) -> str:
    """`url` if it is an http(s) URL with a host and a port and nothing after them; else MalformedMember."""
    if not isinstance(url, str) or not url or len(url) > MAX_TEXT:
        raise MalformedMember("entry has no valid url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise MalformedMember(f"entry has an invalid url: {url[:80]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise MalformedMember(f"entry url must be http(s)://HOST:PORT: {url[:80]!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise MalformedMember(f"entry url must be http(s)://HOST:PORT: {url[:80]!r}")
    return url.rstrip("/")


def _text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise MalformedMember(f"entry has an invalid {key}")
    return value or None


def _load(obj: Any) -> dict[str, int]:
    """The load report's non-negative integer counts (anything else in it is dropped)."""
    if not isinstance(obj, dict):
        return {}
    counts = {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }
    return dict(list(counts.items())[:MAX_LOAD_KEYS])

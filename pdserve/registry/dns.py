"""`dns://NAME:PORT`: every address a name has (a Kubernetes headless Service), followed as it changes.

    --decode dns://decode.pdserve.svc.cluster.local:8000
        -> http://10.0.3.7:8000, http://10.0.5.2:8000, ...   (re-resolved every `interval` seconds)

Resolution runs off the event loop (the loop's getaddrinfo uses its thread pool), or through the
`resolve` function given, which tests replace. A name that fails to resolve keeps its last answer (a
DNS hiccup must not empty the cluster); one that resolves to nothing has no members. Answers are
bounded (MAX_ADDRESSES per name) and must be IP addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from pdserve.registry.limits import RateLimitedLog
from pdserve.registry.member import Role
from pdserve.registry.membership import Membership, Seen

logger = logging.getLogger(__name__)

SCHEME = "dns://"
DEFAULT_INTERVAL_S = 3.0
MAX_ADDRESSES = 256
Resolve = Callable[[str, int], Awaitable[Sequence[str]]]


def is_dns_url(url: str) -> bool:
    return url.strip().lower().startswith(SCHEME)


def parse_dns_url(url: str) -> tuple[str, int]:
    """(name, port) of `dns://NAME:PORT`; ValueError otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if parts is None or parts.scheme != "dns" or not parts.hostname or port is None or parts.path.strip("/"):
        raise ValueError(f"a DNS instance address is dns://NAME:PORT, got {url!r}")
    return parts.hostname, port


async def getaddrinfo(name: str, port: int) -> list[str]:
    """Every IP address of `name` (IPv4 and IPv6), via the system resolver on the loop's thread pool."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def address_url(address: str, port: int) -> str:
    """http://ADDRESS:PORT for one resolved address (ValueError: not an IP address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not for URLs
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}"


class DnsMembership(Membership):
    """The instances behind some dns:// URLs, each with its role."""

    name = "dns"

    def __init__(
        self,
        names: Iterable[tuple[Role, str]],
        resolve: Resolve = getaddrinfo,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.names = [(role, *parse_dns_url(url)) for role, url in names]
        self.resolve = resolve
        self.interval = interval
        self._last: dict[tuple[str, int], frozenset[str]] = {}
        self._log = {(name, port): RateLimitedLog(logger) for _, name, port in self.names}

    async def poll(self) -> frozenset[Seen]:
        keys = {(name, port) for _, name, port in self.names}
        answers = await asyncio.gather(*(self._urls(name, port) for name, port in keys))
        urls = dict(zip(keys, answers, strict=True))
        return frozenset(Seen(role, url) for role, name, port in self.names for url in urls[(name, port)])

    async def _urls(self, name: str, port: int) -> frozenset[str]:
        log = self._log[(name, port)]
        try:
            addresses = await self.resolve(name, port)
            urls = frozenset(address_url(a, port) for a in list(addresses)[: MAX_ADDRESSES * 2])
        except (OSError, ValueError, UnicodeError) as e:
            log.failure("dns://%s:%d does not resolve (%s); keeping its last addresses", name, port, e)
            return self._last.get((name, port), frozenset())
        if len(urls) > MAX_ADDRESSES:
            log.failure("dns://%s:%d has %d addresses; following %d", name, port, len(urls), MAX_ADDRESSES)
            urls = frozenset(sorted(urls)[:MAX_ADDRESSES])
        else:
            log.recovered("dns://%s:%d resolves again", name, port)
        if urls != self._last.get((name, port)):
            logger.info("dns://%s:%d -> %s", name, port, ", ".join(sorted(urls)) or "no addresses")
        self._last[(name, port)] = urls
        return urls

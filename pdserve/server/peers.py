"""An instance's view of its peers: the instances of the other role it may hand client requests to,
whether each can serve, and how busy each is (server/entry.py uses it when this instance is the entry).

    PeerSource   where the peers' URLs come from. StaticPeers (--prefill / --decode URL...) today; a
                 registry or a DNS name can feed the same one method, `urls()`, read before every poll
    Peers        the router's own pieces, reused: one router/instances.Instance per URL, kept fresh by a
                 HealthPoller (GET /health, then /pd/info: role, kv_addr, load) through an Upstream client
                 that carries this instance's API key

A URL the source stops naming leaves at the next poll; a new one joins there (healthy once it answers).
A source's URLs are bounded and validated: a bad one is skipped with a warning, never trusted.
Peers knows nothing of requests; the entry modules choose among the healthy ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.router.instances import HealthPoller, Instance, Registry, Role, normalize_url
from pdserve.router.upstream import Upstream

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0  # as the router's default --health-interval
POLL_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 600.0  # a relayed answer may stream this long
MAX_PEERS = 256  # more URLs from a source than this: the rest are ignored (and said so)


class PeerSource(Protocol):
    """Where an instance learns the URLs of its peers of one role."""

    def urls(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class StaticPeers:
    """The URLs given on the command line, for the life of the process."""

    fixed: tuple[str, ...]

    def urls(self) -> Sequence[str]:
        return self.fixed


class Peers:
    """The peers of one `role` this instance hands requests to, polled while `start`ed."""

    def __init__(self, role: Role, source: PeerSource, headers: Mapping[str, str]) -> None:
        self.role = role
        self.source = source
        self.registry = Registry()
        self.client = Upstream(REQUEST_TIMEOUT_S, headers=headers)
        self.poller = _SyncingPoller(self)

    def sync(self) -> None:
        """Follow the source: keep the peers it still names (with their state), add new ones."""
        urls = _valid_urls(self.source.urls())
        known = {i.url: i for i in self.registry.instances}
        for url in urls.keys() - known.keys():
            logger.info("peer %s (%s) joins", url, self.role)
        for url in known.keys() - urls.keys():
            logger.info("peer %s (%s) leaves", url, self.role)
        self.registry.instances = [known.get(url) or Instance(url, self.role) for url in urls]

    def healthy(self, exclude: Sequence[str] = ()) -> list[Instance]:
        return self.registry.healthy(self.role, exclude)

    def why_none(self) -> str:
        return self.registry.why_none(self.role)

    def describe(self) -> list[dict[str, Any]]:
        return [i.describe() for i in self.registry.instances]

    async def start(self) -> None:
        await self.poller.check_all()
        self.poller.start()

    async def stop(self) -> None:
        await self.poller.stop()
        await self.client.aclose()


class _SyncingPoller(HealthPoller):
    """The router's poller, reading the source again before each round."""

    def __init__(self, peers: Peers) -> None:
        super().__init__(peers.registry, peers.client, POLL_INTERVAL_S, POLL_TIMEOUT_S)
        self.peers = peers

    async def check_all(self) -> None:
        self.peers.sync()
        await super().check_all()


def _valid_urls(urls: Sequence[str]) -> dict[str, None]:
    """The source's URLs normalized, deduplicated and bounded, in order (a dict keeps the order)."""
    valid: dict[str, None] = {}
    for url in list(urls)[: MAX_PEERS + 1]:
        try:
            valid[normalize_url(str(url))] = None
        except ValueError as e:
            logger.warning("ignoring a peer URL: %s", e)
    if len(valid) > MAX_PEERS:
        logger.warning("more than %d peers named: the rest are ignored", MAX_PEERS)
        valid = dict.fromkeys(list(valid)[:MAX_PEERS])
    return valid

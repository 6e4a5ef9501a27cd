"""Keeping the router's instance table in step with the cluster's membership, while serving.

    StaticMembership (--prefill/--decode/--instance URLs)  ┐
    DnsMembership    (dns://NAME:PORT in those lists)      ├─ each polled every its own interval
    RedisMembership  (--registry redis://...)              ┘        │ union of the latest answers
                                                                    ▼
                                      Registry.sync: joiners health-checked at once, leavers dropped

A source that cannot answer (MembershipUnavailable) keeps its previous answer. Without dns:// URLs or a
registry the router never starts this: its URL list is fixed, as it always was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from pdserve.registry.dns import DnsMembership, is_dns_url
from pdserve.registry.member import Role
from pdserve.registry.membership import Membership, MembershipUnavailable, Seen, StaticMembership
from pdserve.registry.watch import RedisMembership
from pdserve.router.instances import Instance, Registry, normalize_url

logger = logging.getLogger(__name__)


def membership_sources(
    lists: Sequence[tuple[Role, Sequence[str]]], registry_url: str | None, on_registry: Callable[[bool], None]
) -> list[Membership]:
    """The sources for the router's URL lists (static and dns://) and its --registry; [] when all of its
    instances are static URLs (nothing to follow)."""
    static = [Seen(role, normalize_url(u)) for role, urls in lists for u in urls if not is_dns_url(u)]
    names = [(role, u) for role, urls in lists for u in urls if is_dns_url(u)]
    if not names and registry_url is None:
        return []
    sources: list[Membership] = [StaticMembership(static)]
    if names:
        sources.append(DnsMembership(names))
    if registry_url is not None:
        sources.append(RedisMembership(registry_url, on_state=on_registry))
    return sources


class MembershipWatcher:
    """Polls each source and syncs `registry`; `on_join` is called for each instance that joins."""

    def __init__(
        self, registry: Registry, sources: Sequence[Membership], on_join: Callable[[Instance], None]
    ) -> None:
        self.registry, self.sources, self.on_join = registry, list(sources), on_join
        self._latest: dict[int, frozenset[Seen]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """One poll of every source (so the first health check sees them), then follow each."""
        await asyncio.gather(*(self._poll(i, s) for i, s in enumerate(self.sources)))
        self._apply()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(i, s)) for i, s in enumerate(self.sources)]

    async def _poll(self, index: int, source: Membership) -> bool:
        try:
            seen = await source.poll()
        except MembershipUnavailable:
            return False
        except Exception:  # noqa: BLE001 - a source's bug must not stop the others or the router
            logger.exception("membership source %s failed", source.name)
            return False
        changed = self._latest.get(index) != seen
        self._latest[index] = seen
        return changed

    async def _follow(self, index: int, source: Membership) -> None:
        while True:
            await asyncio.sleep(source.interval)
            if await self._poll(index, source):
                self._apply()

    def _apply(self) -> None:
        seen = frozenset().union(*self._latest.values())
        for instance in self.registry.sync(seen):
            self.on_join(instance)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for source in self.sources:
            await source.close()

"""The one interface the router's instance table follows: who is in the cluster now, by role.

A `Membership` answers `poll()` with the set of (role, URL) it sees now, every `interval` seconds; a
source that cannot tell right now (Redis down, a DNS failure) raises `MembershipUnavailable`, and the
caller keeps the answer it had (instances keep serving with the peers they know). Sources:

    StaticMembership   URLs from the command line: always the same answer
    DnsMembership      dns://NAME:PORT, every address of the name (dns.py)
    RedisMembership    the instances registered in Redis, with a TTL (watch.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.registry.member import Role


class MembershipUnavailable(Exception):
    """A source cannot say who is there right now; its last answer stands."""


@dataclass(frozen=True)
class Seen:
    """One instance a source sees: its role and its HTTP URL."""

    role: Role
    url: str


class Membership(ABC):
    """A source of cluster members, polled every `interval` seconds."""

    interval: float = 1.0
    name: str = "membership"

    @abstractmethod
    async def poll(self) -> frozenset[Seen]: ...

    async def close(self) -> None:  # noqa: B027 - most sources hold nothing
        """Release what the source holds (connections)."""


class StaticMembership(Membership):
    """Instances named by URL on the command line: their set never changes."""

    name = "static"

    def __init__(self, seen: Iterable[Seen]) -> None:
        self.seen = frozenset(seen)
        self.interval = 3600.0

    async def poll(self) -> frozenset[Seen]:
        return self.seen

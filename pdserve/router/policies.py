"""Which healthy instance takes the next request: round_robin or least_loaded.

A policy sees only candidates (healthy, not excluded, of one role) and never touches the network.

least_loaded, per stage:
    prefill   load = prompt tokens queued and in flight (requests where tokens are not reported)
    decode    load = requests running, waiting for KV or queued; instances holding more than
              `decode_max_queued` queued requests are skipped unless all of them do (BladeLLM's
              select_decode_max_batched); ties go to the instance with the most free KV blocks
    both      as decode
Instances within a band of the least loaded (10% above the minimum) count as equally loaded and one
of them is picked at random (FastDeploy's splitwise scheduler), so routers and bursts do not pile onto
one instance.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from pdserve.router.instances import Instance, Role

BAND = 0.10


class Policy(ABC):
    """Chooses one of `candidates` (non-empty, all healthy, all of `role`)."""

    name: str

    @abstractmethod
    def choose(self, candidates: Sequence[Instance], role: Role) -> Instance: ...


class RoundRobin(Policy):
    """Each role's instances in turn (by URL order, skipping the unhealthy ones)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters = {role: itertools.count() for role in ("prefill", "decode", "both")}

    def choose(self, candidates: Sequence[Instance], role: Role) -> Instance:
        ordered = sorted(candidates, key=lambda i: i.url)
        return ordered[next(self._counters[role]) % len(ordered)]


class LeastLoaded(Policy):
    """The least loaded instance of a role, at random within a band; see the module docstring."""

    name = "least_loaded"

    def __init__(self, decode_max_queued: int = 64, rng: random.Random | None = None) -> None:
        self.decode_max_queued = decode_max_queued
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Instance], role: Role) -> Instance:
        if role == "prefill":
            return self._pick(least_band(candidates, lambda i: i.prefill_tokens))
        pool = [i for i in candidates if i.queued <= self.decode_max_queued] or list(candidates)
        band = least_band(pool, lambda i: i.running)
        most_free = max(i.free_blocks for i in band)
        return self._pick([i for i in band if i.free_blocks == most_free])

    def _pick(self, band: Sequence[Instance]) -> Instance:
        return band[0] if len(band) == 1 else self.rng.choice(list(band))


def least_band(candidates: Sequence[Instance], load: Callable[[Instance], int]) -> list[Instance]:
    """The candidates whose load is at most 10% above the smallest (exact ties when it is 0)."""
    loads = [(load(i), i) for i in candidates]
    lowest = min(value for value, _ in loads)
    return [i for value, i in loads if value <= lowest * (1 + BAND)]


def make_policy(name: str, decode_max_queued: int = 64, rng: random.Random | None = None) -> Policy:
    if name == RoundRobin.name:
        return RoundRobin()
    if name == LeastLoaded.name:
        return LeastLoaded(decode_max_queued, rng)
    raise ValueError(f"unknown policy {name!r}; choose round_robin or least_loaded")


POLICIES = (RoundRobin.name, LeastLoaded.name)

"""Which healthy instance takes the next request: round_robin, least_loaded, power_of_two, cache_aware.

A policy sees only candidates (healthy, not excluded, of one role) and, for cache_aware, the request's
body; it never touches the network.

least_loaded, per stage:
    prefill   load = prompt tokens queued and in flight (requests where tokens are not reported)
    decode    load = requests running, waiting for KV or queued; instances holding more than
              `decode_max_queued` queued requests are skipped unless all of them do (BladeLLM's
              select_decode_max_batched); ties go to the instance with the most free KV blocks
    both      as decode
Instances within a band of the least loaded (10% above the minimum) count as equally loaded and one
of them is picked at random (FastDeploy's splitwise scheduler), so routers and bursts do not pile onto
one instance.

power_of_two: two candidates at random (of those least_loaded would consider), the less loaded of them
by the same load; no scan of every instance, and several routers do not herd onto one instance.

cache_aware (prefix affinity, as SGLang's router and Dynamo's KV router): the instance that most recently
served the longest prefix of this prompt (prefix_index.py) takes it, for prefill and for decode each
with its own index, unless its load exceeds the least loaded one's by the imbalance threshold:

    affinity holds while  load(cached) <= imbalance * (load(least) + one request)

(one request: this prompt's tokens for prefill, 1 where load counts requests; `--cache-imbalance`,
default 2.0). Beyond it, or with no prefix served anywhere, least_loaded chooses. Either way the
chosen instance now owns the prompt's prefixes.

State: the router keeps no state that another router lacks except the prefix index, which is soft
state: losing it (a restart, another router taking the request) only costs cache hits, never a wrong
answer. Loads come from the instances' reports, so routers behind one Service agree on them.
"""

from __future__ import annotations

import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pdserve.router.instances import Instance, Role
from pdserve.router.prefix_index import DEFAULT_CAPACITY, Chain, PrefixIndex, prompt_chain

BAND = 0.10
DEFAULT_IMBALANCE = 2.0


class Policy(ABC):
    """Chooses one of `candidates` (non-empty, all healthy, all of `role`); `body` is the request's."""

    name: str

    @abstractmethod
    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance: ...

    def forget(self, url: str) -> None:
        """An instance left the cluster: drop what the policy keeps about it (most keep nothing)."""
        return None


class RoundRobin(Policy):
    """Each role's instances in turn (by URL order, skipping the unhealthy ones)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters = {role: itertools.count() for role in ("prefill", "decode", "both")}

    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance:
        ordered = sorted(candidates, key=lambda i: i.url)
        return ordered[next(self._counters[role]) % len(ordered)]


def load_of(role: Role) -> Callable[[Instance], int]:
    """The load least_loaded weighs instances of `role` by."""
    return (lambda i: i.prefill_tokens) if role == "prefill" else (lambda i: i.running)


class LeastLoaded(Policy):
    """The least loaded instance of a role, at random within a band; see the module docstring."""

    name = "least_loaded"

    def __init__(self, decode_max_queued: int = 64, rng: random.Random | None = None) -> None:
        self.decode_max_queued = decode_max_queued
        self.rng = rng or random.Random()

    def pool(self, candidates: Sequence[Instance], role: Role) -> list[Instance]:
        """The candidates worth considering: decode instances over `decode_max_queued` only if all are."""
        if role == "prefill":
            return list(candidates)
        return [i for i in candidates if i.queued <= self.decode_max_queued] or list(candidates)

    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance:
        band = least_band(self.pool(candidates, role), load_of(role))
        if role != "prefill":
            most_free = max(i.free_blocks for i in band)
            band = [i for i in band if i.free_blocks == most_free]
        return band[0] if len(band) == 1 else self.rng.choice(band)


class PowerOfTwo(LeastLoaded):
    """Two candidates at random, the less loaded of them (a tie: the first drawn)."""

    name = "power_of_two"

    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance:
        pool = self.pool(candidates, role)
        if len(pool) == 1:
            return pool[0]
        first, second = self.rng.sample(pool, 2)
        load = load_of(role)
        return second if load(second) < load(first) else first


class CacheAware(LeastLoaded):
    """The instance that served the longest prefix of this prompt, within the imbalance threshold."""

    name = "cache_aware"

    def __init__(
        self,
        decode_max_queued: int = 64,
        rng: random.Random | None = None,
        imbalance: float = DEFAULT_IMBALANCE,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        super().__init__(decode_max_queued, rng)
        if imbalance < 1:
            raise ValueError("the cache imbalance threshold must be at least 1")
        self.imbalance = imbalance
        self.indexes = {role: PrefixIndex(capacity) for role in ("prefill", "decode", "both")}

    def choose(
        self, candidates: Sequence[Instance], role: Role, body: Mapping[str, Any] | None = None
    ) -> Instance:
        if body is None:
            return super().choose(candidates, role)
        chain = prompt_chain(body)
        chosen = self._cached(self.pool(candidates, role), role, chain)
        if chosen is None:
            chosen = super().choose(candidates, role)
        self.indexes[role].record(chain, chosen.url)
        return chosen

    def _cached(self, pool: list[Instance], role: Role, chain: Chain) -> Instance | None:
        """The pool's instance with the longest served prefix, if within the threshold; else None."""
        matched = self.indexes[role].matches(chain, (i.url for i in pool))
        longest = max(matched.values(), default=0)
        if longest == 0:
            return None
        best = [i for i in pool if matched[i.url] == longest]
        load = load_of(role)
        cached = min(best, key=load)
        reports = (i.load is None or i.load.tokens_in_flight is not None for i in pool)
        in_tokens = role == "prefill" and all(reports)
        unit = sum(chain.weights) // 4 + 1 if in_tokens else 1  # one request, in the load's own unit
        least = min(load(i) for i in pool)
        return cached if load(cached) <= self.imbalance * (least + unit) else None

    def forget(self, url: str) -> None:
        for index in self.indexes.values():
            index.forget(url)


def least_band(candidates: Sequence[Instance], load: Callable[[Instance], int]) -> list[Instance]:
    """The candidates whose load is at most 10% above the smallest (exact ties when it is 0)."""
    loads = [(load(i), i) for i in candidates]
    lowest = min(value for value, _ in loads)
    return [i for value, i in loads if value <= lowest * (1 + BAND)]


def make_policy(
    name: str,
    decode_max_queued: int = 64,
    rng: random.Random | None = None,
    imbalance: float = DEFAULT_IMBALANCE,
) -> Policy:
    if name == RoundRobin.name:
        return RoundRobin()
    if name == LeastLoaded.name:
        return LeastLoaded(decode_max_queued, rng)
    if name == PowerOfTwo.name:
        return PowerOfTwo(decode_max_queued, rng)
    if name == CacheAware.name:
        return CacheAware(decode_max_queued, rng, imbalance)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


POLICIES = (RoundRobin.name, LeastLoaded.name, PowerOfTwo.name, CacheAware.name)

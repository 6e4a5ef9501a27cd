"""The instances behind the router: who they are, whether they can serve, and how busy they are.

The router owns one `Instance` per URL given on its command line, and, with dns:// URLs or a registry,
one per member its sources see now (`Registry.sync`: instances join and leave while serving; a request
in flight keeps the Instance it holds). `HealthPoller` checks each one every
interval (GET /health, then GET /pd/info) and the proxy marks one down at once when it refuses a
connection. A poll that fails on a keep-alive connection the instance had closed is retried on a new
connection first (upstream.py), so a race on an idle connection never takes an instance out. An
instance that is down stays polled, so a restarted process on the same URL comes back.

Load, as the policies see it, is the instance's latest report plus what the router sent it since that
report was requested (so a burst between two polls spreads out instead of landing on one instance). An
instance that does not answer /pd/info reports nothing: there the router's own in-flight count is its
load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pdserve.registry.dns import is_dns_url
from pdserve.registry.membership import Seen
from pdserve.router.upstream import Answer, ConnectFailed, Upstream, UpstreamError, UpstreamTimeout

logger = logging.getLogger(__name__)

TIMEOUT_STRIKES = 3  # consecutive health-probe timeouts before an instance leaves the rotation

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")


@dataclass(frozen=True)
class Load:
    """One load report of an instance (GET /pd/info's "load"); tokens_in_flight None: not reported."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_waiting_for_kv: int = 0
    tokens_in_flight: int | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Load:
        if not isinstance(obj, dict):
            return cls()

        def count(key: str) -> int:
            value = obj.get(key)
            return value if isinstance(value, int) and value >= 0 else 0

        tokens = obj.get("tokens_in_flight")
        return cls(
            num_running=count("num_running"),
            num_waiting=count("num_waiting"),
            num_free_blocks=count("num_free_blocks"),
            num_blocks=count("num_blocks"),
            num_waiting_for_kv=count("num_waiting_for_kv"),
            tokens_in_flight=tokens if isinstance(tokens, int) and tokens >= 0 else None,
        )


@dataclass(frozen=True)
class Info:
    """What GET /pd/info said (a 404 reads as role "both", no kv address, no load report)."""

    role: Role
    model: str | None = None
    kv_addr: str | None = None
    load: Load | None = None

    @classmethod
    def from_json(cls, obj: Any) -> Info:
        if not isinstance(obj, dict) or obj.get("role") not in ROLES:
            raise ValueError(f"/pd/info answered without a valid role: {str(obj)[:200]}")
        kv_addr, model = obj.get("kv_addr"), obj.get("model")
        return cls(
            role=cast(Role, obj["role"]),
            model=model if isinstance(model, str) else None,
            kv_addr=kv_addr if isinstance(kv_addr, str) and kv_addr else None,
            load=Load.from_json(obj.get("load")),
        )


@dataclass
class Instance:
    """One instance as the router knows it. `role` is the role it was given on the router's command line."""

    url: str
    role: Role
    healthy: bool = False
    reason: str = "not checked yet"
    model: str | None = None
    kv_addr: str | None = None
    load: Load | None = None  # None: it does not report load
    inflight: int = 0  # the router's requests to it that have not ended
    inflight_tokens: int = 0
    pending_requests: int = 0  # sent since the latest load report was requested
    pending_tokens: int = 0
    routed: int = 0
    timeouts: int = 0  # health probes in a row that timed out

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("instance %s (%s) leaves the rotation: %s", self.url, self.role, reason)
        self.healthy, self.reason = False, reason

    def mark_up(self, info: Info, pending_at_request: tuple[int, int]) -> None:
        if not self.healthy:
            logger.info("instance %s (%s) is healthy", self.url, self.role)
        self.healthy, self.reason, self.timeouts = True, "ok", 0
        self.model, self.kv_addr, self.load = info.model, info.kv_addr, info.load
        self.pending_requests = max(0, self.pending_requests - pending_at_request[0])
        self.pending_tokens = max(0, self.pending_tokens - pending_at_request[1])

    def begin(self, tokens: int) -> None:
        self.inflight += 1
        self.inflight_tokens += tokens
        self.pending_requests += 1
        self.pending_tokens += tokens
        self.routed += 1

    def end(self, tokens: int) -> None:
        self.inflight = max(0, self.inflight - 1)
        self.inflight_tokens = max(0, self.inflight_tokens - tokens)

    # ---- load, as the policies see it ----

    @property
    def running(self) -> int:
        """Requests it is working on (decode or colocated): running + waiting for KV + queued."""
        if self.load is None:
            return self.inflight
        load = self.load
        return load.num_running + load.num_waiting + load.num_waiting_for_kv + self.pending_requests

    @property
    def queued(self) -> int:
        """Requests it holds but does not run yet."""
        if self.load is None:
            return 0
        return self.load.num_waiting + self.load.num_waiting_for_kv + self.pending_requests

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens queued and in flight (prefill); requests where tokens are not reported."""
        if self.load is None:
            return self.inflight_tokens
        if self.load.tokens_in_flight is None:
            return self.load.num_waiting + self.load.num_running + self.pending_requests
        return self.load.tokens_in_flight + self.pending_tokens

    @property
    def free_blocks(self) -> int:
        return self.load.num_free_blocks if self.load is not None else 0

    def describe(self) -> dict[str, Any]:
        load = self.load
        return {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "reason": self.reason,
            "model": self.model,
            "kv_addr": self.kv_addr,
            "load": None if load is None else load.__dict__,
            "inflight": self.inflight,
            "routed": self.routed,
        }


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"instance URL must be http(s): {url!r}")
    return url


@dataclass
class Registry:
    """All instances, by role; `colocated` when they are "both" instances (`--instance`)."""

    instances: list[Instance] = field(default_factory=list)
    # told the URL of each instance that leaves (the cache_aware policy forgets what it served)
    on_leave: Callable[[str], None] | None = None

    @classmethod
    def build(cls, prefill: Iterable[str], decode: Iterable[str], both: Iterable[str]) -> Registry:
        """The instances named by URL (dns:// names join later, through `sync`)."""
        instances: list[Instance] = []
        for role, urls in (("prefill", prefill), ("decode", decode), ("both", both)):
            instances += [Instance(normalize_url(u), cast(Role, role)) for u in urls if not is_dns_url(u)]
        seen = [i.url for i in instances]
        if len(set(seen)) != len(seen):
            raise ValueError("each instance URL may be given once")
        return cls(instances)

    def sync(self, seen: Iterable[Seen]) -> list[Instance]:
        """Follow the members the sources see now: new ones join (not healthy until checked), missing
        ones leave. A URL seen in two roles keeps the role it has (else the first role in ROLES order).
        Returns the instances that joined."""
        wanted: dict[str, Role] = {}
        for s in sorted(seen, key=lambda s: (ROLES.index(s.role), s.url)):
            url = normalize_url(s.url)
            have = next((i.role for i in self.instances if i.url == url and i.role == s.role), None)
            wanted[url] = have or wanted.get(url, s.role)
        kept = [i for i in self.instances if wanted.get(i.url) == i.role]
        for gone in (i for i in self.instances if wanted.get(i.url) != i.role):
            logger.info("instance %s (%s) left the cluster", gone.url, gone.role)
            if self.on_leave is not None:
                self.on_leave(gone.url)
        known = {i.url for i in kept}
        joined = [Instance(url, role) for url, role in wanted.items() if url not in known]
        for new in joined:
            logger.info("instance %s (%s) joined the cluster", new.url, new.role)
        self.instances = kept + joined  # a new list: a scrape iterating the old one is undisturbed
        return joined

    @property
    def colocated(self) -> bool:
        """Colocated ("both") instances only; with any prefill or decode instance the router disaggregates."""
        roles = {i.role for i in self.instances}
        return "both" in roles and not roles & {"prefill", "decode"}

    @property
    def needed_roles(self) -> tuple[Role, ...]:
        return ("both",) if self.colocated else ("prefill", "decode")

    def of_role(self, role: Role) -> list[Instance]:
        return [i for i in self.instances if i.role == role]

    def healthy(self, role: Role, exclude: Iterable[str] = ()) -> list[Instance]:
        skip = set(exclude)
        return [i for i in self.of_role(role) if i.healthy and i.url not in skip]

    def why_none(self, role: Role) -> str:
        """A message for "no healthy instance of `role`", with each one's reason."""
        reasons = "; ".join(f"{i.url}: {i.reason}" for i in self.of_role(role))
        name = "colocated ('both')" if role == "both" else role
        return f"no healthy {name} instance ({reasons})"


def role_problem(expected: Role, info: Info) -> str | None:
    """Why an instance that answered `info` cannot serve as `expected`, or None."""
    if expected == "both" and info.role != "both":
        return f"reports role {info.role!r}, but --instance needs a colocated ('both') instance"
    if expected != "both" and info.role != expected:  # a 'both' decode would refuse every hand-off
        return f"reports role {info.role!r}, expected {expected!r} (--role {expected})"
    if expected == "prefill" and info.kv_addr is None:
        return "reports no kv_addr, so no decode instance can reach it (is it running with --role prefill?)"
    return None


class HealthPoller:
    """Checks every instance every `interval` seconds; `check_soon` asks for an early check of one."""

    def __init__(self, registry: Registry, client: Upstream, interval: float, timeout: float) -> None:
        self.registry = registry
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._soon: set[asyncio.Task[None]] = set()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self.registry.instances))

    async def check(self, instance: Instance) -> None:
        pending = (instance.pending_requests, instance.pending_tokens)
        try:
            info = await self._probe(instance.url)
        except UpstreamTimeout:
            # A busy instance can answer slowly (its engine shares the CPU with the HTTP loop): only
            # several timeouts in a row take it out. A refused connection does at once.
            instance.timeouts += 1
            if instance.timeouts >= TIMEOUT_STRIKES or not instance.healthy:
                instance.mark_down(f"timed out {instance.timeouts} times in a row")
            return
        except (UpstreamError, ValueError) as e:
            instance.mark_down(_describe(e))
            return
        problem = role_problem(instance.role, info)
        if problem is not None:
            instance.mark_down(problem)
            return
        instance.mark_up(info, pending)

    async def _probe(self, url: str) -> Info:
        health = await self.client.get(f"{url}/health", timeout=self.timeout)
        if health.status_code != 200:
            raise ValueError(f"/health answered {health.status_code}: {_error_message(health)}")
        answer = await self.client.get(f"{url}/pd/info", timeout=self.timeout)
        if answer.status_code == 404:
            return Info(role="both")
        if answer.status_code != 200:
            raise ValueError(f"/pd/info answered {answer.status_code}: {_error_message(answer)}")
        return Info.from_json(answer.json())

    def check_soon(self, instance: Instance) -> None:
        task = asyncio.get_running_loop().create_task(self.check(instance))
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad answer
                logger.exception("health poll failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._soon] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _describe(error: Exception) -> str:
    if isinstance(error, ConnectFailed):
        return "connection refused"
    if isinstance(error, UpstreamTimeout):
        return "timed out"
    return str(error) or type(error).__name__


def _error_message(response: Answer) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]

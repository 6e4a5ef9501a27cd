"""The server's side of `--registry`: this instance's entry, kept in Redis while the app is served.

    entry = {role, model, url (how peers reach this HTTP front), kv_addr, tp, load}

The URL's host is --kv-advertise-host when given, else --host, else (a wildcard bind) this machine's
name. Registration starts with the app (its lifespan) and its entry is removed when the app stops, or
at once when a drain begins (SIGTERM: server/drain.py);
`pdserve_registry_up` (0/1) on /metrics says whether the latest refresh reached Redis.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

from prometheus_client import CollectorRegistry, Gauge

from pdserve.config import ServerConfig
from pdserve.engine.engine_front import EngineFront
from pdserve.registry.member import Member, Role
from pdserve.registry.redis_keys import redact
from pdserve.registry.redis_registry import Registration

logger = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def advertised_url(config: ServerConfig) -> str:
    host = config.engine.disagg.kv_advertise_host or config.host
    if host in _WILDCARDS:
        host = socket.getfqdn()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.port}"


def member_of(engine: EngineFront, config: ServerConfig) -> Callable[[], Member]:
    url = advertised_url(config)
    tp = config.engine.model.tensor_parallel_size

    def entry() -> Member:
        model = config.served_model_name or engine.model_name or None
        return Member(cast(Role, engine.role), url, model, engine.kv_addr, tp, dict(engine.load))

    return entry


def registration_lifespan(
    engine: EngineFront,
    config: ServerConfig,
    metrics_registry: CollectorRegistry,
    on_drain: list[Callable[[], Awaitable[None]]] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[None]] | None:
    """The app's lifespan that registers this instance; None without --registry. While it runs,
    `on_drain` (a drain's first steps) holds the step that removes the entry."""
    if config.registry is None:
        return None
    url: str = config.registry
    up = Gauge(
        "pdserve_registry_up", "1: the latest registry refresh reached Redis", registry=metrics_registry
    )

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        registration = Registration(
            url, member_of(engine, config), config.registry_ttl, lambda ok: up.set(ok)
        )
        registration.start()

        async def leave() -> None:
            await registration.stop()
            logger.info("draining: removed from the registry %s", redact(url))

        if on_drain is not None:
            on_drain.append(leave)
        try:
            yield
        finally:
            if on_drain is not None and leave in on_drain:
                on_drain.remove(leave)
            await registration.stop()

    return lifespan

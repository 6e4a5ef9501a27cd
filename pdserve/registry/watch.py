"""The router's view of the Redis registry: every valid entry, read every `interval` seconds.

    SCAN pdserve:member:* (at most MAX_MEMBERS keys)  ->  MGET  ->  Member.parse each  ->  {Seen(role, url)}

An entry that does not parse, or whose key does not match its URL, is ignored and logged (rate-limited);
it never reaches the instance table. Expired instances simply stop being there: Redis removes their key.
Redis down: `poll` raises MembershipUnavailable (the router keeps the instances it knows) and
`on_state(False)` is called; the router's pdserve_registry_up gauge follows it. Back after an outage
(perhaps restarted empty), the registry fills again as instances write their entries; until
REFILL_GRACE_S has passed or all of them are back, the instances known before the outage stay in the
answer, so the router never empties its table meanwhile (one that died in the outage fails its health
checks anyway, and leaves when the grace ends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pdserve.registry.limits import RateLimitedLog
from pdserve.registry.member import MalformedMember, Member
from pdserve.registry.membership import Membership, MembershipUnavailable, Seen
from pdserve.registry.redis_keys import IO_TIMEOUT_S, KEY_PREFIX, MAX_MEMBERS, connect, member_key, redact

logger = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 0.5  # joins are seen within this plus one health check
REFILL_GRACE_S = 10.0  # instances write their entries again well within this after an outage


class RedisMembership(Membership):
    """The instances registered in the Redis at `url`."""

    name = "redis"

    def __init__(
        self,
        url: str,
        interval: float = DEFAULT_INTERVAL_S,
        on_state: Callable[[bool], None] = lambda up: None,
    ) -> None:
        self.url, self.interval, self.on_state = url, interval, on_state
        self._client: Any = connect(url)
        self._down = RateLimitedLog(logger)
        self._bad = RateLimitedLog(logger)
        self._known: frozenset[Seen] = frozenset()  # the latest answer before an outage
        self._refill_until: float | None = None  # None: in an outage; else the end of its grace

    async def poll(self) -> frozenset[Seen]:
        try:
            members = await asyncio.wait_for(self._read(), IO_TIMEOUT_S * 2)
        except Exception as e:  # noqa: BLE001 - any client failure means "cannot tell now"
            self.on_state(False)
            self._refill_until = None
            self._down.failure(
                "registry %s unreachable (%s); keeping the instances known", redact(self.url), e
            )
            raise MembershipUnavailable(str(e)) from None
        self.on_state(True)
        self._down.recovered("registry %s reachable again", redact(self.url))
        return self._after_outage(frozenset(Seen(m.role, m.url) for m in members))

    def _after_outage(self, seen: frozenset[Seen]) -> frozenset[Seen]:
        now = time.monotonic()
        if self._refill_until is None:
            self._refill_until = now + REFILL_GRACE_S if self._known else now
        if now < self._refill_until and not self._known <= seen:
            return seen | self._known
        self._refill_until, self._known = now, seen  # refilled (or the grace is over)
        return seen

    async def _read(self) -> list[Member]:
        keys: list[bytes] = []
        async for key in self._client.scan_iter(match=KEY_PREFIX + "*", count=200):
            keys.append(key)
            if len(keys) >= MAX_MEMBERS:
                self._bad.failure("registry holds more than %d members; following the first", MAX_MEMBERS)
                break
        if not keys:
            return []
        values = await self._client.mget(keys)
        return [
            m
            for key, raw in zip(keys, values, strict=True)
            if raw is not None and (m := self._parse(key, raw))
        ]

    def _parse(self, key: bytes, raw: bytes) -> Member | None:
        try:
            member = Member.parse(raw)
        except MalformedMember as e:
            self._bad.failure("ignoring registry entry %.120r: %s", key, e)
            return None
        if member_key(member.url).encode() != key:
            self._bad.failure("ignoring registry entry %.120r: its url is %.120r", key, member.url)
            return None
        return member

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            logger.debug("closing the registry client failed", exc_info=True)

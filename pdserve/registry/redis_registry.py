"""An instance's registration: its entry in Redis under a key that expires, kept alive while it serves.

    every ttl/3 s:  SET pdserve:member:<url> <Member JSON> PX ttl      (a fresh load report each time)
    clean exit:     DEL pdserve:member:<url>
    killed:         nothing; the key expires after ttl and routers drop the instance

Redis down: the instance goes on serving; the loop retries with backoff, warns (rate-limited) and says
so through `on_state(False)` (the server's pdserve_registry_up gauge), and `on_state(True)` once its
entry is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pdserve.registry.limits import Backoff, RateLimitedLog
from pdserve.registry.member import Member
from pdserve.registry.redis_keys import IO_TIMEOUT_S, connect, member_key, redact

logger = logging.getLogger(__name__)
DEFAULT_TTL_S = 10.0


class Registration:
    """Keeps `entry()` registered at `url` (a redis:// URL) while running."""

    def __init__(
        self,
        url: str,
        entry: Callable[[], Member],
        ttl: float = DEFAULT_TTL_S,
        on_state: Callable[[bool], None] = lambda up: None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("--registry-ttl must be positive")
        self.url, self.entry, self.ttl, self.on_state = url, entry, ttl, on_state
        self.up = False
        self._client: Any = connect(url)
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLog(logger)
        self._backoff = Backoff(most=max(0.5, ttl / 3))

    async def refresh(self) -> None:
        """Write the entry once (raises the client's error if Redis does not take it)."""
        member = self.entry()
        ttl_ms = max(1, int(self.ttl * 1000))
        await asyncio.wait_for(
            self._client.set(member_key(member.url), member.to_json(), px=ttl_ms), IO_TIMEOUT_S
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - redis raises many kinds; serving goes on regardless
                self._set_up(False)
                self._log.failure("registry %s unreachable (%s); serving on, retrying", redact(self.url), e)
                await asyncio.sleep(self._backoff.next())
                continue
            self._backoff.reset()
            self._set_up(True)
            self._log.recovered("registered in %s as %s", redact(self.url), self.entry().url)
            await asyncio.sleep(self.ttl / 3)

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.on_state(up)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop refreshing and remove the entry (best effort: an unreachable Redis lets it expire)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.delete(member_key(self.entry().url)), IO_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self._client.aclose()

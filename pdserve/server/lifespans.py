"""One app lifespan out of several (registration in a registry, polling an entry's peers), entered in
order and left in reverse; None when there are none."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]


def combined(lifespans: list[Lifespan | None]) -> Lifespan | None:
    given = [lifespan for lifespan in lifespans if lifespan is not None]
    if not given:
        return None

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for one in given:
                await stack.enter_async_context(one(app))
            yield

    return lifespan

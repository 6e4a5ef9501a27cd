"""What the KV connector hands the engine thread from `poll()`: one small typed action each, which
the engine applies to its requests (the connector never touches a request).

Transport threads queue them (ActionQueue, which also wakes the engine thread); the engine drains
them between steps.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.disagg.handoff import FirstToken, ToDecode


@dataclass(frozen=True)
class StartPrefill:
    """Prefill side: a decode instance reserved blocks and asks us to compute this prompt into them."""

    target: ToDecode
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams' fields, as the Reserve carried them
    num_output_tokens: int = 0  # the last N of prompt_token_ids are outputs (a resumed request)

    @property
    def request_id(self) -> str:
        return f"kv-{self.target.transfer_id}"


@dataclass(frozen=True)
class Activate:
    """Decode side: all of a request's KV landed, and its first token came with it."""

    request_id: str
    first: FirstToken
    num_cached_tokens: int


@dataclass(frozen=True)
class Fail:
    """Either side: the request's transfer failed; it ends with this error."""

    request_id: str
    reason: str
    refused: str = ""  # protocol.Failed.refused: why the prefill would not take it, if it would not


@dataclass(frozen=True)
class Cancel:
    """Prefill side: the decode instance gave up (or went away); stop computing for it, silently."""

    request_id: str


@dataclass(frozen=True)
class Release:
    """A finished request's blocks were in use by a transfer when it ended; now they may be freed."""

    request_id: str


Action = StartPrefill | Activate | Fail | Cancel | Release


class ActionQueue:
    """Actions for the engine thread, from any thread; each one wakes the engine (`wake`, set by its
    driver) so it is applied without waiting for the next poll."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Action] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None

    def put(self, action: Action) -> None:
        self._queue.put(action)
        self.wake()

    def drain(self) -> list[Action]:
        actions: list[Action] = []
        while not self._queue.empty():
            actions.append(self._queue.get())
        return actions

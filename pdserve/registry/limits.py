"""Backoff between reconnection attempts, and logging that says a thing once, not once per attempt."""

from __future__ import annotations

import logging
import random
import time


class Backoff:
    """Delays that double from `first` up to `most`, with jitter so instances do not retry in step."""

    def __init__(self, first: float = 0.2, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.most, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first


class RateLimitedLog:
    """A warning at most every `every` seconds; recovery is always said (once) when it follows one."""

    def __init__(self, logger: logging.Logger, every: float = 30.0) -> None:
        self.logger, self.every = logger, every
        self._last = -float("inf")
        self._suppressed = 0
        self._failing = False

    def failure(self, message: str, *args: object) -> None:
        self._failing = True
        now = time.monotonic()
        if now - self._last < self.every:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        self.logger.warning(message + more, *args)
        self._last, self._suppressed = now, 0

    def recovered(self, message: str, *args: object) -> None:
        if self._failing:
            self.logger.info(message, *args)
        self._failing, self._last, self._suppressed = False, -float("inf"), 0

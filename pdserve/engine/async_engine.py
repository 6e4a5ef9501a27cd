"""AsyncEngine: the Engine on one dedicated thread of the server's process, driven from asyncio.

    asyncio handlers ──commands (queue.Queue)──▶ engine thread: EngineLoop (apply adds/aborts/calls, step)
          ▲                                                │
          └──── per-request-group asyncio.Queue ◀──────────┘ Sinks.dispatch: call_soon_threadsafe

The Engine is not thread-safe, so every call into it (building it included) happens on the engine
thread (engine_loop.py). Handlers only enqueue commands and await concurrent futures. If a step
raises, every in-flight request gets an error output and the engine is marked dead: later requests are
refused with EngineDeadError, nothing waits forever, and `on_dead` is called (the server exits then,
so that a supervisor restarts it). The same front with the loop in its own process: core_client.py.
This module knows nothing about HTTP or text; tokenization belongs to the caller.
"""

from __future__ import annotations

import concurrent.futures
import copy
import threading
from typing import Any

from pdserve.config import EngineConfig
from pdserve.engine.core_messages import CoreInfo
from pdserve.engine.engine_front import EngineFront, RequestStream
from pdserve.engine.engine_loop import Add, EngineLoop, SubRequest

__all__ = ["AsyncEngine", "RequestStream", "SubRequest"]


class AsyncEngine(EngineFront):
    """Runs an Engine's step loop on a daemon thread; the asyncio side adds, aborts and streams."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._loop = EngineLoop(config, self._deliver)
        self._thread: threading.Thread | None = None

    @property
    def _engine(self) -> Any:
        """The Engine (pdserve.engine.engine), for tests; touch it only on the engine thread."""
        return self._loop.engine

    def start(self, timeout: float | None = None) -> None:
        """Build the Engine on the engine thread and start stepping; raises what building raised."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="pdserve-engine", daemon=True)
        self._thread.start()
        ready.result(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; in-flight requests end with finish_reason "abort"."""
        if self._thread is None or self._loop.stopped:
            return
        self._loop.stop()
        self._thread.join(timeout)
        self._loop.close()

    def is_healthy(self) -> bool:
        thread, loop = self._thread, self._loop
        return thread is not None and thread.is_alive() and loop.fatal is None and not loop.stopped

    @property
    def fatal_error(self) -> str | None:
        return self._loop.fatal

    def _send_add(self, requests: list[SubRequest]) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.submit(Add(requests, done))
        return done

    def _send_abort(self, request_ids: list[str]) -> None:
        self._loop.abort(request_ids)

    def _send_query(self, name: str, args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._loop.query(name, args, done)
        return done

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop
        try:
            loop.build()
            self._publish(loop.engine)
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            loop.stop()
            ready.set_exception(e)
            return
        loop.on_dead = self._tell_dead
        ready.set_result(None)
        loop.run()

    def _publish(self, engine: Any) -> None:
        # The front end tokenizes concurrently with detokenization here: give it its own copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.grammars = engine.grammars  # thread-safe, and the engine thread then finds it compiled
        self._adopt(CoreInfo.of(engine))

    @property
    def load(self) -> dict[str, int]:
        return self._loop.load

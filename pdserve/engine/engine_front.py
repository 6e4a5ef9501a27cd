"""EngineFront: what the server talks to, wherever the engine runs; the streams it hands out.

    asyncio handler ── add(requests) ──▶ EngineFront ──▶ the engine loop (a thread: AsyncEngine;
          ▲                                                another process: CoreClient)
          └── RequestStream (asyncio.Queue) ◀── Sinks.dispatch(one step's outputs) ◀──┘

A request's stream is registered (Sinks) before the request is sent, so no output can arrive before
its listener. A step's outputs reach each event loop with one wake-up (call_soon_threadsafe), not one
per output. An output whose request has no listener any more is aborted (a client that left still
aborts its request in the engine). This module knows nothing about HTTP, text or how commands travel;
the subclasses own that.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

from pdserve.config import EngineConfig
from pdserve.engine.core_messages import CoreInfo
from pdserve.engine.engine_loop import SubRequest
from pdserve.engine.outputs import EngineStats, RequestOutput
from pdserve.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 30.0
_Batch = list[tuple["asyncio.Queue[RequestOutput]", RequestOutput]]  # (stream queue, output) pairs


@dataclass
class _Sink:
    """Where one request's outputs go: the asyncio loop and queue of the stream that owns it."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput]


class Sinks:
    """Request id -> its stream's sink. Thread-safe: streams open on the event loop, outputs arrive on
    the engine's thread (or the thread reading the engine core's socket)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, _Sink] = {}

    def open(self, request_ids: list[str], outputs: asyncio.Queue[RequestOutput]) -> None:
        sink = _Sink(asyncio.get_running_loop(), outputs)
        with self._lock:
            self._by_id.update(dict.fromkeys(request_ids, sink))

    def close(self, request_ids: list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._by_id.pop(request_id, None)

    def dispatch(self, outputs: list[RequestOutput]) -> list[str]:
        """Hand each output to its stream; returns the unfinished requests nobody listens to."""
        batches: dict[asyncio.AbstractEventLoop, _Batch] = {}
        orphans: list[str] = []
        with self._lock:
            for out in outputs:
                sink = (
                    self._by_id.pop(out.request_id, None) if out.finished else self._by_id.get(out.request_id)
                )
                if sink is not None:
                    batches.setdefault(sink.loop, []).append((sink.outputs, out))
                elif not out.finished:
                    orphans.append(out.request_id)
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, batch)
        return orphans

    def end_all(self, reason: str, error: str | None) -> None:
        """Finish every open stream with `reason` (the engine is gone)."""
        with self._lock:
            ids = list(self._by_id)
        self.dispatch(
            [RequestOutput(i, [], "", finished=True, finish_reason=reason, error=error) for i in ids]
        )


def _put_all(batch: _Batch) -> None:
    for outputs, out in batch:
        outputs.put_nowait(out)


class RequestStream:
    """The outputs of one or more requests added together (n choices share one stream).

    Iterate it until every request has finished; `abort()` (or `aclose()`) ends the unfinished ones.
    """

    def __init__(self, engine: EngineFront, request_ids: list[str], outputs: asyncio.Queue[RequestOutput]):
        self._engine = engine
        self._outputs = outputs
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        out = await self._outputs.get()
        if out.finished:
            self._unfinished.discard(out.request_id)
        return out

    def abort(self) -> None:
        """Abort every request of this stream that has not finished (idempotent)."""
        if self._unfinished:
            self._engine.abort(*self._unfinished)
            self._unfinished.clear()

    async def aclose(self) -> None:
        self.abort()


class EngineFront(abc.ABC):
    """The engine as the server sees it: add/generate/abort, a few queries, health and model facts.

    Subclasses say where the loop runs: `_send_add`, `_send_abort`, `_send_query`, `start`, `shutdown`,
    `is_healthy`, `fatal_error`; `start` sets the model facts below and `grammars`.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.on_dead: Callable[[str], None] | None = None  # called once, on an engine-side thread
        self.tokenizer: Any = None  # the front's own: it tokenizes while the engine detokenizes
        self.grammars: Any = None  # structured.compiler.Grammars: a bad schema is refused before queuing
        self.max_model_len = 0
        self.model_name = ""
        self.model_dir = ""
        self.role = config.disagg.role
        self.kv_addr: str | None = None
        self._load: dict[str, int] = {}
        self._sinks = Sinks()

    @property
    def load(self) -> dict[str, int]:
        """The engine's load after its latest step (/pd/info, routers), read without waiting for it."""
        return self._load

    def _adopt(self, info: CoreInfo) -> None:
        """The model facts of the engine just built (the tokenizer and grammars are the subclass's)."""
        self.max_model_len = info.max_model_len
        self.model_name = info.model_name
        self.model_dir = info.model_dir
        self.kv_addr = info.kv_addr
        self._load = info.load

    # ---- where the engine runs (subclasses) --------------------------------------------------------------

    @abc.abstractmethod
    def start(self, timeout: float | None = None) -> None:
        """Build the Engine and start stepping; raises what building raised."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; in-flight requests end with finish_reason "abort"."""

    @abc.abstractmethod
    def is_healthy(self) -> bool: ...

    @property
    @abc.abstractmethod
    def fatal_error(self) -> str | None: ...

    @abc.abstractmethod
    def _send_add(self, requests: list[SubRequest]) -> concurrent.futures.Future[None]:
        """Queue the requests (EngineDeadError at once if it cannot); the future: added, or why not."""

    @abc.abstractmethod
    def _send_abort(self, request_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def _send_query(self, name: str, args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        """Run engine_loop.QUERIES[name](engine, *args) between two steps (also on a dead engine)."""

    # ---- asyncio API --------------------------------------------------------------------------------------

    async def add(self, requests: list[SubRequest]) -> RequestStream:
        """Add requests as one group; raises InvalidRequestError/OverloadedError/EngineDeadError at once.

        Either all of them are added or none (a failure aborts the ones already added).
        """
        await self._compile_grammars(requests)
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        ids = [r[0] for r in requests]
        self._sinks.open(ids, outputs)
        try:
            await asyncio.wrap_future(self._send_add(requests))
        except asyncio.CancelledError:
            self.abort(*ids)  # applied after the add, in order: the requests never leak
            raise
        except BaseException:
            self._sinks.close(ids)
            raise
        return RequestStream(self, ids, outputs)

    async def _compile_grammars(self, requests: list[SubRequest]) -> None:
        """Compile the requests' grammars on a worker thread (InvalidRequestError for a bad one), so a
        bad one is refused here, and the engine does not stop every request while it compiles."""
        if self.grammars is None:
            return
        for spec in {r[2].structured for r in requests} - {None}:
            await asyncio.to_thread(self.grammars.compile, spec)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; stopping early (disconnect, cancel, break) aborts it."""
        stream = await self.add([(request_id, prompt_token_ids, params, None, None)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, *request_ids: str) -> None:
        """Abort requests by id (unknown or finished ones are ignored). Safe from any thread."""
        if request_ids:
            self._sinks.close(list(request_ids))
            self._send_abort(list(request_ids))

    async def stats(self) -> EngineStats:
        return cast(EngineStats, await self._query("stats"))

    async def check_pool_free(self) -> bool:
        return bool(await self._query("check_pool_free"))

    async def refuse_reserves(self, reason: str) -> None:
        """A prefill instance that drains: new Reserves get Failed(`reason`), started transfers go on."""
        await self._query("refuse_reserves", reason)

    async def _query(self, name: str, *args: Any) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self._send_query(name, args)), QUERY_TIMEOUT_S)

    # ---- engine side --------------------------------------------------------------------------------------

    def _tell_dead(self, reason: str) -> None:
        on_dead, self.on_dead = self.on_dead, None  # once
        if on_dead is not None:
            try:
                on_dead(reason)
            except Exception:  # noqa: BLE001 - the engine is dead either way
                logger.exception("the engine's on_dead callback failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs, on the engine-side thread: to their streams; orphans are aborted."""
        if not outputs:
            return
        orphans = self._sinks.dispatch(outputs)
        if orphans:
            self._send_abort(orphans)

"""AsyncEngine: the Engine on one dedicated thread, driven from asyncio.

    asyncio handlers ──commands (queue.Queue)──▶ loop thread: apply adds/aborts/calls, then Engine.step()
          ▲                                                │
          └──── per-request-group asyncio.Queue ◀──────────┘ loop.call_soon_threadsafe(queue.put_nowait)

The Engine is not thread-safe, so every call into it (building it included) happens on the loop thread.
Handlers only enqueue commands and await concurrent futures. When nothing is running the thread blocks on
the command queue; it never spins. If `step()` raises, every in-flight request gets an error output and
the engine is marked dead: later requests are refused with EngineDeadError, nothing waits forever,
and `on_dead` is called (the server exits then, so that a supervisor restarts it). A failure that
belongs to one request (a peer's bad message, a token that cannot be detokenized) fails that request
inside the Engine and never reaches this point.
This module knows nothing about HTTP or text; tokenization belongs to the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdserve.config import EngineConfig
from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.outputs import EngineStats, RequestOutput
from pdserve.engine.resume import Resume
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import EngineDeadError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# (request_id, prompt_token_ids, params, handoff, resume): handoff names the prefill instance, if any;
# resume: the outputs a resumed request already has (engine/resume.py)
SubRequest = tuple[str, list[int], SamplingParams, FromPrefill | None, Resume | None]


@dataclass
class _Add:
    requests: list[SubRequest]
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput]
    done: concurrent.futures.Future[None]


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: concurrent.futures.Future[Any]


class _Stop:
    pass


class _Wake:
    """Something arrived from a peer (KV, a prompt to prefill): step now."""


_Command = _Add | _Abort | _Call | _Stop | _Wake

IDLE_POLL_S = 0.2  # with requests in flight elsewhere (KV transfers), step at least this often
_Batch = list[tuple["asyncio.Queue[RequestOutput]", RequestOutput]]  # (stream queue, output) pairs


@dataclass
class _Sink:
    """Where one request's outputs go: the asyncio loop and queue of the stream that owns it."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput]


class RequestStream:
    """The outputs of one or more requests added together (n choices share one stream).

    Iterate it until every request has finished; `abort()` (or `aclose()`) ends the unfinished ones.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], outputs: asyncio.Queue[RequestOutput]):
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


class AsyncEngine:
    """Runs an Engine's step loop on a daemon thread; the asyncio side adds, aborts and streams."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._engine: Any = None  # pdserve.engine.engine.Engine, touched only on the loop thread
        self._sinks: dict[str, _Sink] = {}  # loop thread only
        self._fatal: str | None = None
        self.on_dead: Callable[[str], None] | None = None  # called once, on the loop thread, if it dies
        self._stopped = False
        self._lock = threading.Lock()  # orders "refuse new commands" against "stop"
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.model_name = ""
        self.model_dir = ""

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Build the Engine on the loop thread and start stepping; raises what building raised."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="pdserve-engine", daemon=True)
        self._thread.start()
        ready.result(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; in-flight requests end with finish_reason "abort"."""
        if self._thread is None or self._stopped:
            return
        with self._lock:
            self._stopped = True
            self._commands.put(_Stop())
        self._thread.join(timeout)
        self._engine.close()

    async def refuse_reserves(self, reason: str) -> None:
        """A prefill instance that drains: new Reserves get Failed(`reason`), started transfers go on."""

        def refuse() -> None:
            if self._engine.connector is not None:
                self._engine.connector.sender.refuse(reason)

        await self.call(refuse)

    def is_healthy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._fatal is None and not self._stopped

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    # ---- asyncio API -----------------------------------------------------------------------------------

    async def add(self, requests: list[SubRequest]) -> RequestStream:
        """Add requests as one group; raises InvalidRequestError/OverloadedError/EngineDeadError at once.

        Either all of them are added or none (a failure aborts the ones already added).
        """
        await self._compile_grammars(requests)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Add(requests, loop, outputs, done))
        ids = [r[0] for r in requests]
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(*ids)  # applied after the add, in order: the requests never leak
            raise
        return RequestStream(self, ids, outputs)

    async def _compile_grammars(self, requests: list[SubRequest]) -> None:
        """Compile the requests' grammars on a worker thread (InvalidRequestError for a bad one), so
        the engine thread finds them in the cache instead of stopping every request while it compiles."""
        if self._engine is None:
            return
        grammars = self._engine.grammars  # thread-safe, unlike the rest of the Engine
        for spec in {r[2].structured for r in requests} - {None}:
            await asyncio.to_thread(grammars.compile, spec)

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
            self._commands.put(_Abort(list(request_ids)))

    async def stats(self) -> EngineStats:
        return await self.call(lambda: self._engine.stats())

    async def check_pool_free(self) -> bool:
        return await self.call(lambda: bool(self._engine.check_pool_free()))

    async def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` on the loop thread between two steps and return its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._submit(_Call(fn, done), allow_dead=True)
        return await asyncio.wait_for(asyncio.wrap_future(done), timeout)

    def _submit(self, command: _Add | _Call, allow_dead: bool = False) -> None:
        """Queue a command that expects an answer, or refuse it: it is never left unanswered."""
        with self._lock:
            if self._fatal is not None and not allow_dead:
                raise EngineDeadError(f"the engine has stopped after an error: {self._fatal}")
            if self._stopped or self._thread is None or not self._thread.is_alive():
                raise EngineDeadError("the engine is not running")
            self._commands.put(command)

    # ---- loop thread -----------------------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._build()
        except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug in the loop itself: fail loudly, hang nobody
            logger.exception("engine loop crashed")
            self._fatal = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._stopped = True
            self._end_all("abort" if self._fatal is None else "error", self._fatal)
            self._refuse_pending()
            if self._fatal is not None:
                self._tell_dead(self._fatal)

    def _refuse_pending(self) -> None:
        """After the loop: answer whatever is still queued (nothing can be queued any more)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add | _Call) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineDeadError("the engine has stopped"))

    def _build(self) -> None:
        from pdserve.engine.engine import Engine

        self._engine = Engine(self.config)
        # The front end tokenizes concurrently with detokenization here: give it its own copy.
        self.tokenizer = copy.deepcopy(self._engine.tokenizer)
        self.max_model_len = int(self._engine.max_model_len)
        self.model_name = str(self._engine.model_name)
        self.model_dir = str(self._engine.config.model.path)  # resolved: a directory
        self.role = self.config.disagg.role
        connector = self._engine.connector
        self.kv_addr: str | None = connector.address if connector is not None else None
        if connector is not None:
            connector.wake = lambda: self._commands.put(_Wake())
        # Published after every step, read without waiting for the engine thread (/pd/info, routers).
        self.load: dict[str, int] = self._engine.load()

    def _loop(self) -> None:
        while True:
            alive = self._fatal is None
            busy = alive and self._engine.has_unfinished() and not self._engine.idle
            # Nothing to compute: sleep until a command or a peer wakes us; with requests waiting on
            # peers (or a connector to keep alive) wake now and then for timeouts and heartbeats.
            timeout = IDLE_POLL_S if alive and self._engine.connector is not None else None
            if not self._apply_commands(block=not busy, timeout=timeout):
                return
            if self._fatal is None and (self._engine.has_unfinished() or self._engine.connector is not None):
                self._step()

    def _apply_commands(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands (waiting for one when `block`); False once told to stop."""
        try:
            command = self._commands.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _Add):
            self._apply_add(command)
        elif isinstance(command, _Abort):
            for request_id in command.request_ids:
                self._abort_one(request_id)
        elif isinstance(command, _Wake):
            pass
        elif isinstance(command, _Call):
            if not command.done.set_running_or_notify_cancel():
                return
            try:
                command.done.set_result(command.fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller
                command.done.set_exception(e)

    def _apply_add(self, command: _Add) -> None:
        if not command.done.set_running_or_notify_cancel():
            return  # the caller gave up before we got here (its abort follows)
        if self._fatal is not None:
            command.done.set_exception(EngineDeadError(f"the engine has stopped: {self._fatal}"))
            return
        added: list[str] = []
        try:
            for request_id, prompt_token_ids, params, handoff, resume in command.requests:
                self._engine.add_request(request_id, prompt_token_ids, params, handoff, resume)
                added.append(request_id)
                self._sinks[request_id] = _Sink(command.loop, command.outputs)
        except Exception as e:  # noqa: BLE001 - InvalidRequestError/OverloadedError go to the caller
            for request_id in added:
                self._abort_one(request_id)
            command.done.set_exception(e)
            return
        command.done.set_result(None)

    def _abort_one(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is None:
            return  # finished already, or never added
        try:
            self._engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - an abort must never take the loop down
            logger.exception("abort of %s failed", request_id)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as e:  # noqa: BLE001 - fatal: report to everyone, keep answering commands
            logger.exception("engine step failed; the engine is now dead")
            self._fatal = f"{type(e).__name__}: {e}"
            self._end_all("error", self._fatal)
            self._shut_connector(self._fatal)
            self._tell_dead(self._fatal)
            return
        self.load = self._engine.load()
        self._deliver(outputs)

    def _tell_dead(self, reason: str) -> None:
        on_dead, self.on_dead = self.on_dead, None  # once
        if on_dead is not None:
            try:
                on_dead(reason)
            except Exception:  # noqa: BLE001 - the engine is dead either way
                logger.exception("the engine's on_dead callback failed")

    def _shut_connector(self, reason: str) -> None:
        """Tell KV peers now that this engine is dead (its transfers fail, its Reserves are refused)."""
        connector = self._engine.connector
        if connector is not None:
            try:
                connector.shut(f"the engine of {connector.address} has stopped: {reason}")
            except Exception:  # noqa: BLE001 - the engine is already dead; this is a courtesy
                logger.exception("telling KV peers failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its stream: one wake-up per event loop per step, not one per output."""
        batches: dict[asyncio.AbstractEventLoop, _Batch] = {}
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                batches.setdefault(sink.loop, []).append((sink.outputs, out))
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, batch)

    def _end_all(self, reason: str, error: str | None) -> None:
        """Finish every in-flight request with `reason` (the engine is gone or going)."""
        outputs = [
            RequestOutput(request_id, [], "", finished=True, finish_reason=reason, error=error)
            for request_id in self._sinks
        ]
        self._deliver(outputs)
        self._sinks.clear()


def _put_all(batch: _Batch) -> None:
    for outputs, out in batch:
        outputs.put_nowait(out)

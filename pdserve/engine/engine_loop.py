"""EngineLoop: one Engine stepped by whichever thread calls `run()`, fed by a command queue.

    commands (queue.Queue): Add, Abort, Call, Wake, Stop ──▶ run(): apply them, then Engine.step()
                                                                 │
                                                    emit(outputs of one step) ◀┘

Both places the engine runs use it: a thread of the server's process (async_engine.py) and the engine
core process (core_process.py); what `emit` does with a step's outputs is theirs. The Engine is not
thread-safe, so every call into it (building it included) happens on the thread that runs the loop.
When nothing is running the loop blocks on the queue; it never spins. If `step()` raises, every
request in flight ends with an error output, KV peers are told, `on_dead` is called once, and later
adds are refused with EngineDeadError; calls (stats) are still answered until Stop.
This module knows nothing about HTTP, asyncio or text.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.config import EngineConfig
from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.resume import Resume
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import EngineDeadError

logger = logging.getLogger(__name__)

# (request_id, prompt_token_ids, params, handoff, resume): handoff names the prefill instance, if any;
# resume: the outputs a resumed request already has (engine/resume.py)
SubRequest = tuple[str, list[int], SamplingParams, FromPrefill | None, Resume | None]
Emit = Callable[[list[RequestOutput]], None]


@dataclass
class Add:
    requests: list[SubRequest]
    done: concurrent.futures.Future[None]


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class Call:
    fn: Callable[[Any], Any]  # called with the Engine
    done: concurrent.futures.Future[Any]


class Stop:
    pass


class Wake:
    """Something arrived from a peer (KV, a prompt to prefill): step now."""


Command = Add | Abort | Call | Stop | Wake

IDLE_POLL_S = 0.2  # with requests in flight elsewhere (KV transfers), step at least this often


def _refuse_reserves(engine: Any, reason: str) -> None:
    if engine.connector is not None:
        engine.connector.sender.refuse(reason)


# The engine queries a front may make by name (a name crosses a process boundary, a lambda does not).
QUERIES: dict[str, Callable[..., Any]] = {
    "stats": lambda engine: engine.stats(),
    "check_pool_free": lambda engine: bool(engine.check_pool_free()),
    "refuse_reserves": _refuse_reserves,  # a draining prefill instance: new Reserves get Failed(reason)
}


# Queries safe from any thread (the connector's Sender has its own lock): answered at once, not after
# the step in flight (a draining prefill instance refuses the next Reserve, not one a step later).
ANY_THREAD = frozenset({"refuse_reserves"})


def _answer(done: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
    """Set `done` to fn()'s result or exception, unless its caller has given up on it."""
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(fn())
    except Exception as e:  # noqa: BLE001 - handed to the caller
        done.set_exception(e)


class EngineLoop:
    """An Engine, its command queue and the requests it serves; `run()` steps it until Stop."""

    def __init__(self, config: EngineConfig, emit: Emit) -> None:
        self.config = config
        self.emit = emit  # called on the loop thread after each step with its outputs for the front
        self.commands: queue.Queue[Command] = queue.Queue()
        self.engine: Any = None  # pdserve.engine.engine.Engine, touched only on the loop thread
        self.live: set[str] = set()  # requests added and not finished (loop thread only)
        self.fatal: str | None = None
        self.stopped = True  # until built; then until Stop
        self.on_dead: Callable[[str], None] | None = None  # called once, on the loop thread, if it dies
        self._lock = threading.Lock()  # orders "refuse new commands" against "stop"
        self.load: dict[str, int] = {}  # published after every step, read from any thread

    def build(self) -> None:
        """Build the Engine (on the thread that will run the loop); raises what building raises."""
        from pdserve.engine.engine import Engine

        self.engine = Engine(self.config)
        if self.engine.connector is not None:
            self.engine.connector.wake = lambda: self.commands.put(Wake())
        self.load = self.engine.load()
        self.stopped = False

    def submit(self, command: Add | Call, allow_dead: bool = False) -> None:
        """Queue a command that expects an answer, or refuse it: it is never left unanswered."""
        with self._lock:
            if self.fatal is not None and not allow_dead:
                raise EngineDeadError(f"the engine has stopped after an error: {self.fatal}")
            if self.stopped:
                raise EngineDeadError("the engine is not running")
            self.commands.put(command)

    def query(self, name: str, args: tuple[Any, ...], done: concurrent.futures.Future[Any]) -> None:
        """Answer QUERIES[name](engine, *args) through `done`: between two steps (also on a dead
        engine), or at once for ANY_THREAD ones; EngineDeadError if the loop has stopped."""
        fn = QUERIES[name]
        if name in ANY_THREAD:
            _answer(done, lambda: fn(self.engine, *args))
        else:
            self.submit(Call(lambda engine: fn(engine, *args), done), allow_dead=True)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (unknown or finished ones are ignored). Safe from any thread."""
        if request_ids:
            self.commands.put(Abort(request_ids))

    def stop(self) -> None:
        """Ask `run()` to return; in-flight requests end with finish_reason "abort". Any thread."""
        with self._lock:
            self.stopped = True
            self.commands.put(Stop())

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def run(self) -> None:
        """Step until Stop (or a bug in the loop itself), then answer whatever is left."""
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - a bug in the loop itself: fail loudly, hang nobody
            logger.exception("engine loop crashed")
            self.fatal = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self.stopped = True
            if self.fatal is not None:
                self._tell_dead(self.fatal)
            self._end_all("abort" if self.fatal is None else "error", self.fatal)
            self._refuse_pending()

    def _refuse_pending(self) -> None:
        """After the loop: answer whatever is still queued (nothing can be queued any more)."""
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, Add | Call) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineDeadError("the engine has stopped"))

    def _loop(self) -> None:
        while True:
            alive = self.fatal is None
            busy = alive and self.engine.has_unfinished() and not self.engine.idle
            # Nothing to compute: sleep until a command or a peer wakes us; with requests waiting on
            # peers (or a connector to keep alive) wake now and then for timeouts and heartbeats.
            timeout = IDLE_POLL_S if alive and self.engine.connector is not None else None
            if not self._apply_commands(block=not busy, timeout=timeout):
                return
            if self.fatal is None and (self.engine.has_unfinished() or self.engine.connector is not None):
                self._step()

    def _apply_commands(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands (waiting for one when `block`); False once told to stop."""
        try:
            command = self.commands.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return True
        while True:
            if isinstance(command, Stop):
                return False
            self._apply(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: Command) -> None:
        if isinstance(command, Add):
            self._apply_add(command)
        elif isinstance(command, Abort):
            for request_id in command.request_ids:
                self._abort_one(request_id)
        elif isinstance(command, Call):
            _answer(command.done, functools.partial(command.fn, self.engine))

    def _apply_add(self, command: Add) -> None:
        if not command.done.set_running_or_notify_cancel():
            return  # the caller gave up before we got here (its abort follows)
        if self.fatal is not None:
            command.done.set_exception(EngineDeadError(f"the engine has stopped: {self.fatal}"))
            return
        added: list[str] = []
        try:
            for request_id, prompt_token_ids, params, handoff, resume in command.requests:
                self.engine.add_request(request_id, prompt_token_ids, params, handoff, resume)
                added.append(request_id)
                self.live.add(request_id)
        except Exception as e:  # noqa: BLE001 - InvalidRequestError/OverloadedError go to the caller
            for request_id in added:
                self._abort_one(request_id)
            command.done.set_exception(e)
            return
        command.done.set_result(None)

    def _abort_one(self, request_id: str) -> None:
        if request_id not in self.live:
            return  # finished already, or never added
        self.live.discard(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:  # noqa: BLE001 - an abort must never take the loop down
            logger.exception("abort of %s failed", request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fatal: report to everyone, keep answering commands
            logger.exception("engine step failed; the engine is now dead")
            self.fatal = f"{type(e).__name__}: {e}"
            self._tell_dead(self.fatal)  # first: a front must know it is dead when the errors arrive
            self._end_all("error", self.fatal)
            self._shut_connector(self.fatal)
            return
        self.load = self.engine.load()
        outputs = [out for out in outputs if out.request_id in self.live]  # not a peer's, nor aborted
        for out in outputs:
            if out.finished:
                self.live.discard(out.request_id)
        self.emit(outputs)  # even with none: the load may have changed

    def _tell_dead(self, reason: str) -> None:
        on_dead, self.on_dead = self.on_dead, None  # once (the front's callback logs its own errors)
        if on_dead is not None:
            on_dead(reason)

    def _shut_connector(self, reason: str) -> None:
        """Tell KV peers now that this engine is dead (its transfers fail, its Reserves are refused)."""
        connector = self.engine.connector
        if connector is not None:
            try:
                connector.shut(f"the engine of {connector.address} has stopped: {reason}")
            except Exception:  # noqa: BLE001 - the engine is already dead; this is a courtesy
                logger.exception("telling KV peers failed")

    def _end_all(self, reason: str, error: str | None) -> None:
        """Finish every in-flight request with `reason` (the engine is gone or going)."""
        outputs = [
            RequestOutput(request_id, [], "", finished=True, finish_reason=reason, error=error)
            for request_id in self.live
        ]
        self.live.clear()
        if outputs:
            self.emit(outputs)

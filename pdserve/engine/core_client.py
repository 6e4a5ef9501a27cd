"""CoreClient: the server's front of an engine that runs in its own process (core_process.py).

    asyncio handlers ── add/abort/query ──PUSH──▶ engine core process (EngineLoop on its main thread)
          ▲                                               │ one StepOutputs per step, Replies, Dead
          └── RequestStream ◀── Sinks.dispatch ◀── pdserve-core-out thread ◀──PULL──┘

The same interface as AsyncEngine (engine_front.py), so the server cannot tell them apart; what
differs is that uvicorn, FastAPI, SSE and JSON no longer share a GIL with the engine's step loop. The
front keeps its own tokenizer and grammar compiler (a bad schema is still a 400 before queuing).
The core dying in any way (killed, OOM, a CUDA error, a failed step) marks the front dead at once: the
output thread watches the process's sentinel beside the socket; every open stream ends with an error,
every pending add or query fails with EngineDeadError, and `on_dead` is called once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import zmq

from pdserve.config import EngineConfig
from pdserve.engine import core_messages as m
from pdserve.engine.engine_front import EngineFront
from pdserve.engine.engine_loop import SubRequest
from pdserve.errors import EngineDeadError

logger = logging.getLogger(__name__)


class CoreClient(EngineFront):
    """Starts the engine core process, sends it commands, and routes its outputs to the streams."""

    def __init__(self, config: EngineConfig, traces: tuple[str | None, str] = (None, "")) -> None:
        super().__init__(config)
        self._traces = traces  # (OTLP endpoint, service name): the core's spans (a prefill's) go there too
        self._context: zmq.Context[Any] = zmq.Context()
        self._dir = ""
        self._commands: Any = None  # zmq PUSH socket, sent on under _lock
        self._results: Any = None  # zmq PULL socket, read by the output thread only
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # the command socket, _pending, _seq and the running state
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._seq = 0
        self._running = False
        self._stopping = False
        self._fatal: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Spawn the core, wait until its Engine is built; raises what building it raised."""
        from pdserve.engine.core_process import run_core

        self._dir = tempfile.mkdtemp(prefix="pdserve-core-")
        in_addr, out_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.bind(in_addr)
        self._results = self._context.socket(zmq.PULL)
        self._results.bind(out_addr)
        spawn = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        args = (self.config, in_addr, out_addr, os.getpid(), level, self._traces)
        # not a daemon: a daemonic process may not have children, and --tp ranks are the core's
        self._process = spawn.Process(target=run_core, args=args, name="pdserve-engine-core")
        self._process.start()
        try:
            self._publish(self._wait_ready(timeout))
        except BaseException:
            self._stopping = True  # a later shutdown() has nothing left to do
            self._kill()
            raise
        self._running = True
        self._reader = threading.Thread(target=self._read, name="pdserve-core-out", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float | None) -> m.CoreInfo:
        assert self._process is not None
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(left))
            if self._results in events:
                message = m.loads(self._results.recv())
                if isinstance(message, m.StartFailed):
                    raise message.error
                assert isinstance(message, m.Ready), message
                return message.info
            if events:  # only the sentinel: it died without a word (killed, OOM)
                self._process.join(5)
                raise RuntimeError(f"the engine core exited with {self._process.exitcode} while starting")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the engine core did not start within {timeout} s")

    def _publish(self, info: m.CoreInfo) -> None:
        from transformers import AutoTokenizer

        from pdserve.structured.compiler import Grammars

        self.tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_dir)
        self.grammars = Grammars(self.tokenizer, info.vocab_size, info.eos_token_ids)
        self._adopt(info)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (in-flight requests end with finish_reason "abort") and wait for it."""
        if self._process is None or self._stopping:
            return
        with self._lock:
            self._stopping = True
            if self._process.is_alive():
                self._commands.send(m.dumps(m.Shutdown()))
        self._process.join(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._kill()

    def _kill(self) -> None:
        """Whatever is left of the core and the sockets (after a clean stop: nothing but files)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        for sock in (self._commands, self._results):
            if sock is not None:
                sock.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def is_healthy(self) -> bool:
        return self._running and self._fatal is None and not self._stopping

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    # ---- commands ------------------------------------------------------------------------------------

    def _send_add(self, requests: list[SubRequest]) -> concurrent.futures.Future[None]:
        return self._request(lambda seq: m.AddRequests(seq, requests), allow_dead=False)

    def _send_query(self, name: str, args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        return self._request(lambda seq: m.Query(seq, name, args), allow_dead=True)

    def _request(self, message: Any, allow_dead: bool) -> concurrent.futures.Future[Any]:
        """Send a command that expects a Reply, or refuse it: it is never left unanswered."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._fatal is not None and not allow_dead:
                raise EngineDeadError(f"the engine has stopped after an error: {self._fatal}")
            if not self._running or self._stopping:
                raise EngineDeadError("the engine is not running")
            self._seq += 1
            self._pending[self._seq] = done
            self._commands.send(m.dumps(message(self._seq)))
        return done

    def _send_abort(self, request_ids: list[str]) -> None:
        with self._lock:
            if self._running:
                self._commands.send(m.dumps(m.AbortRequests(request_ids)))

    # ---- the output thread ---------------------------------------------------------------------------

    def _read(self) -> None:
        """Route the core's messages until it exits; then end whatever is still open."""
        process = self._process
        assert process is not None
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(process.sentinel, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                while self._results.poll(0):  # everything it sent before it exited comes first
                    self._handle(m.loads(self._results.recv()))
                if process.sentinel in events:
                    break
        except Exception as e:  # noqa: BLE001 - a bug here must not leave streams waiting forever
            logger.exception("reading the engine core's messages failed")
            with self._lock:
                self._fatal = self._fatal or f"the engine core's messages could not be read: {e}"
            process.kill()
        process.join(5)
        self._gone(process.exitcode)

    def _handle(self, message: Any) -> None:
        if isinstance(message, m.StepOutputs):
            self._load = message.load
            self._deliver(message.outputs())
        elif isinstance(message, m.Reply):
            with self._lock:
                done = self._pending.pop(message.seq, None)
            if done is not None and done.set_running_or_notify_cancel():
                if message.error is not None:
                    done.set_exception(message.error)
                else:
                    done.set_result(message.value)
        elif isinstance(message, m.Dead):
            with self._lock:
                self._fatal = message.reason
            self._tell_dead(message.reason)

    def _gone(self, exitcode: int | None) -> None:
        """The core has exited: after Shutdown that is the end; otherwise the engine has died."""
        with self._lock:
            self._running = False
            pending, self._pending = self._pending, {}
            if not self._stopping and self._fatal is None:
                self._fatal = f"the engine core process exited with code {exitcode}"
        reason = self._fatal
        for done in pending.values():
            if done.set_running_or_notify_cancel():
                done.set_exception(EngineDeadError(f"the engine has stopped: {reason or 'shut down'}"))
        self._sinks.end_all("error" if reason else "abort", reason)
        if reason is not None:
            logger.error("the engine core has died: %s", reason)
            self._tell_dead(reason)

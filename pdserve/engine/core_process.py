"""The engine core process: builds the Engine, steps it, and talks to its front over ZeroMQ.

    main thread:    EngineLoop.run(): apply commands, Engine.step() ──▶ one StepOutputs per step ──▶ front
    pdserve-core-in: recv ◀── front (AddRequests, AbortRequests, Query, Shutdown) ──▶ loop's command queue

The core owns the GPU, the KV connector and its transport threads; the server's process never touches
the Engine, so the loop never waits for Python work on the HTTP side (one GIL each). It lives exactly as
long as its front: SIGINT and SIGTERM are ignored (the front stops it with Shutdown after draining),
and a front that dies takes it along (PR_SET_PDEATHSIG on Linux, and a poll of the parent's pid).
Started with the 'spawn' method by core_client.py; CUDA cannot survive a fork.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import threading
from typing import Any

import zmq

from pdserve.config import EngineConfig
from pdserve.engine import core_messages as m
from pdserve.engine.engine_loop import Add, EngineLoop
from pdserve.engine.outputs import RequestOutput
from pdserve.errors import EngineDeadError
from pdserve.observability import tracing

logger = logging.getLogger(__name__)

PARENT_POLL_S = 1.0  # how often the command thread checks that the front is still there
_PR_SET_PDEATHSIG = 1


class _Wire:
    """The socket to the front; the loop thread and the command thread both send on it."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 5000)  # the last outputs still reach the front at exit
        self._socket.connect(address)
        self._lock = threading.Lock()
        self._load: dict[str, int] = {}

    def send(self, message: object) -> None:
        data = m.dumps(message)
        with self._lock:
            self._socket.send(data)

    def outputs(self, outputs: list[RequestOutput], load: dict[str, int]) -> None:
        """One step's outputs and the load after it; nothing if neither is news."""
        if outputs or load != self._load:
            self._load = load
            self.send(m.StepOutputs.of(outputs, load))

    def reply(self, seq: int, done: concurrent.futures.Future[Any]) -> None:
        error = done.exception()
        if error is None:
            self.send(m.Reply(seq, done.result()))
        else:
            self.send(m.Reply(seq, error=m.portable(error)))

    def close(self) -> None:
        self._socket.close()


def run_core(
    config: EngineConfig,
    in_addr: str,
    out_addr: str,
    parent_pid: int,
    log_level: int,
    traces: tuple[str | None, str] = (None, ""),
) -> None:
    """The child's entry point (multiprocessing 'spawn' target)."""
    _follow_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the front decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so does the supervisor's SIGTERM: the front drains
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tracing.setup(*traces)
    try:
        _serve(config, in_addr, out_addr, parent_pid)
    finally:
        tracing.shutdown()


def _serve(config: EngineConfig, in_addr: str, out_addr: str, parent_pid: int) -> None:
    """Build the Engine, say Ready (or why not), then step it until Shutdown."""
    context: zmq.Context[Any] = zmq.Context()
    wire = _Wire(context, out_addr)
    commands = context.socket(zmq.PULL)
    commands.connect(in_addr)
    loop = EngineLoop(config, lambda outputs: wire.outputs(outputs, loop.load))
    try:
        try:
            loop.build()
        except BaseException as e:  # noqa: BLE001 - handed to the front's start()
            wire.send(m.StartFailed(m.portable(e)))
            return
        wire.send(m.Ready(m.CoreInfo.of(loop.engine)))
        loop.on_dead = lambda reason: wire.send(m.Dead(reason))
        reader = threading.Thread(
            target=_read_commands,
            args=(commands, loop, wire, parent_pid),
            name="pdserve-core-in",
            daemon=True,
        )
        reader.start()
        loop.run()
        loop.close()
    finally:
        wire.close()
        commands.close(linger=0)
        context.term()


def _read_commands(commands: zmq.Socket[Any], loop: EngineLoop, wire: _Wire, parent_pid: int) -> None:
    """Turn the front's messages into the loop's commands, until Shutdown (or the front is gone)."""
    while True:
        if not commands.poll(int(PARENT_POLL_S * 1000)):
            if os.getppid() != parent_pid:
                logger.error("the server process is gone; the engine core exits")
                os._exit(1)
            continue
        message = m.loads(commands.recv())
        if isinstance(message, m.Shutdown):
            loop.stop()
            return
        if isinstance(message, m.AbortRequests):
            loop.abort(message.request_ids)
        elif isinstance(message, m.AddRequests | m.Query):
            _pass_on(loop, message, wire)


def _pass_on(loop: EngineLoop, message: m.AddRequests | m.Query, wire: _Wire) -> None:
    """Hand an add or a query to the loop; its Reply goes to the front when it is answered."""
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    done.add_done_callback(functools.partial(wire.reply, message.seq))
    try:
        if isinstance(message, m.AddRequests):
            loop.submit(Add(message.requests, done))
        else:
            loop.query(message.name, message.args, done)
    except EngineDeadError as e:
        done.set_exception(e)


def _follow_parent(parent_pid: int) -> None:
    """Die with the front: the kernel sends SIGKILL when the parent exits (Linux); elsewhere, or if the
    parent is already gone, the command thread's poll of the parent's pid does it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)

"""TCP transport over ZeroMQ: one ROUTER socket per instance (the `--kv-port`) receives everything;
one DEALER per peer sends. An I/O thread owns all sockets; other threads queue sends and wake it.

Wire: [header: protocol JSON] or [header, payload: raw KV bytes]. Payloads go out zero-copy (the
gathered block buffer itself); the receiver copies each payload once, into its KV pool.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

import zmq

from pdserve.disagg.protocol import Message, decode, encode
from pdserve.disagg.transport.base import KVTransport, MessageHandler

logger = logging.getLogger(__name__)

SEND_HWM = 256  # messages queued per peer before sends are dropped


class TcpTransport(KVTransport):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        if port:
            self.router.bind(f"tcp://{host}:{port}")
        else:
            port = self.router.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{advertise_host or host}:{port}"
        self.outbox: queue.SimpleQueue[tuple[str, bytes, Any]] = queue.SimpleQueue()
        wake_addr = f"inproc://wake-{id(self)}"
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(wake_addr)
        self.wake_push = self.ctx.socket(zmq.PUSH)
        self.wake_push.connect(wake_addr)
        self.wake_lock = threading.Lock()
        self.dealers: dict[str, zmq.Socket] = {}
        self.forget: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.handler: MessageHandler | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kv-transport", daemon=True)

    def start(self, on_message: MessageHandler) -> None:
        self.handler = on_message
        self.thread.start()

    def send(self, peer: str, msg: Message, payload: Any | None = None) -> None:
        self.outbox.put((peer, encode(msg), payload))
        self._wake()

    def forget_peer(self, peer: str) -> None:
        self.forget.put(peer)
        self._wake()

    def _wake(self) -> None:
        with self.wake_lock, contextlib.suppress(zmq.ZMQError):  # closing: nobody to wake
            self.wake_push.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        self.stopped.set()
        self._wake()
        if self.thread.is_alive():
            self.thread.join(5)
        with self.wake_lock:
            self.wake_push.close(0)
        self.ctx.destroy(0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        while not self.stopped.is_set():
            events = dict(poller.poll(200))
            if self.wake_pull in events:
                while self.wake_pull.poll(0):
                    self.wake_pull.recv()
            if self.router in events:
                self._receive_all()
            self._flush()
        for sock in self.dealers.values():
            sock.close(0)
        self.router.close(0)
        self.wake_pull.close(0)

    def _receive_all(self) -> None:
        while self.router.poll(0):
            frames = self.router.recv_multipart(copy=False)
            try:
                msg = decode(frames[1].bytes)
            except (ValueError, IndexError) as e:
                logger.warning("dropping a malformed control message: %s", e)
                continue
            payload = frames[2].buffer if len(frames) > 2 else None
            assert self.handler is not None
            try:
                self.handler(msg, payload)
            except Exception:  # a bad message must not kill the I/O thread
                logger.exception("handling %s failed", type(msg).__name__)

    def _flush(self) -> None:
        while not self.forget.empty():
            sock = self.dealers.pop(self.forget.get(), None)
            if sock is not None:
                sock.close(0)
        while not self.outbox.empty():
            peer, header, payload = self.outbox.get()
            frames = [header] if payload is None else [header, payload]
            try:
                self._dealer(peer).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                logger.warning("send queue to %s is full; message dropped", peer)

    def _dealer(self, peer: str) -> zmq.Socket:
        sock = self.dealers.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.connect(peer)
            self.dealers[peer] = sock
        return sock

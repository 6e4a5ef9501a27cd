"""TCP transport: control messages over ZeroMQ, KV bytes over a plain TCP stream.

An instance listens on two consecutive ports: `--kv-port` (a ZeroMQ ROUTER for control messages) and
`--kv-port + 1` (KV data). Peers name an instance by its control address alone.

    control: DEALER per peer -> peer's ROUTER          [JSON header]
    data:    one TCP connection per peer, one thread    [u32 header length][JSON KVData][raw KV bytes]

The data path avoids ZeroMQ because its message copies halved loopback throughput: the sender writes
the gathered block buffer with `sendall`; the receiver asks the connector where the bytes go and
`recv_into`s them straight into the reserved blocks of the KV pool (no copy), or, where the pool is on
a GPU, into a pinned buffer that the connector then copies up (one copy). Control messages and data
travel separately, so the receiver must not rely on their relative order (the connector waits for
both). KV blocks of a GPU pool are copied into a pinned host buffer before they are sent.

With a cluster secret both channels admit only peers that prove it (auth.py): the control sockets
speak CURVE (encrypted, a ZAP handler on the control thread checks the client key) and each data
connection opens with a mutual HMAC challenge. KV bytes on the data connection are not encrypted.
Without a secret (the offline API, library use) both stay plain.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.cluster_secret import ClusterSecret
from pdserve.disagg.protocol import Failed, Message, decode, encode
from pdserve.disagg.transport import auth
from pdserve.disagg.transport.base import KVTransport, MessageHandler, PayloadDone, PayloadTarget
from pdserve.disagg.transport.blocks import KVBlocks

logger = logging.getLogger(__name__)

RECV_TIMEOUT_S = 30.0  # a sender silent this long mid-payload is cut off
SEND_HWM = 1024  # control messages queued per peer before sends are dropped
MAX_HEADER_BYTES = 1 << 20  # a KVData header is a few hundred bytes; a longer one is not ours
# Bytes the receiver did not place straight into reserved blocks are staged for the connector to judge
# (it refuses them: a real transfer always lands in place); more than this is not worth reading
MAX_STAGED_BYTES = 64 << 20
_LEN = struct.Struct("!I")


def data_address(control_addr: str) -> tuple[str, int]:
    host, port = control_addr.removeprefix("tcp://").rsplit(":", 1)
    return host.strip("[]"), int(port) + 1


class TcpTransport(KVTransport):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        secret: ClusterSecret | None = None,
    ) -> None:
        self.secret = secret
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        auth.make_server(self.router, secret)
        # bound before the ROUTER: no connection may arrive while nobody answers its ZAP request
        self.gate = None if secret is None else auth.ZapGate(self.ctx, self.router, secret)
        self.data_refused = auth.RateLimitedLog("KV data: refused a connection")
        self.listener, port = self._bind_pair(host, port)
        self.address = f"tcp://{advertise_host or host}:{port}"
        self.outbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        wake_addr = f"inproc://wake-{id(self)}"
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(wake_addr)
        self.wake_push = self.ctx.socket(zmq.PUSH)
        self.wake_push.connect(wake_addr)
        self.wake_lock = threading.Lock()
        self.dealers: dict[str, zmq.Socket] = {}
        self.forget: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.senders: dict[str, _DataSender] = {}
        self.senders_lock = threading.Lock()
        self.handler: MessageHandler | None = None
        self.payload_target: PayloadTarget | None = None
        self.payload_done: PayloadDone | None = None
        self.handler_lock = threading.Lock()  # one message handled at a time, whichever thread got it
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, name="kv-control", daemon=True),
            threading.Thread(target=self._accept, name="kv-data-accept", daemon=True),
        ]

    def _bind_pair(self, host: str, port: int) -> tuple[socket.socket, int]:
        """Bind the control port and port + 1 for data (any free pair when port is 0)."""
        for _ in range(50):
            ctrl = port or self.router.bind_to_random_port(f"tcp://{host}", 20000, 60000)
            if port:
                self.router.bind(f"tcp://{host}:{port}")
            try:
                listener = socket.create_server((host, ctrl + 1), reuse_port=False)
                return listener, ctrl
            except OSError:
                if port:
                    raise
                endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT)  # bytes: str() would add b''
                self.router.unbind(endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint))
        raise OSError("no free pair of consecutive ports for KV control and data")

    def start(
        self,
        on_message: MessageHandler,
        payload_target: PayloadTarget | None = None,
        payload_done: PayloadDone | None = None,
    ) -> None:
        self.handler = on_message
        self.payload_target, self.payload_done = payload_target, payload_done
        for t in self.threads:
            t.start()

    def send(self, peer: str, msg: Message, payload: Any | None = None) -> None:
        if payload is None:
            self.outbox.put((peer, encode(msg)))
            self._wake()
            return
        if isinstance(payload, KVBlocks):
            payload = payload.to_host()
        with self.senders_lock:
            sender = self.senders.get(peer)
            if sender is None:
                addr, failed = data_address(peer), self._data_failed(peer)
                sender = self.senders[peer] = _DataSender(addr, failed, self.secret)
        sender.put(encode(msg), payload)

    def _data_failed(self, peer: str) -> Callable[[bytes, OSError], None]:
        """What a data sender to `peer` calls when a payload could not go: a Failed for its transfer on
        the control channel (the peer would wait out its transfer timeout for bytes not coming)."""

        def tell(header: bytes, error: OSError) -> None:
            tid = getattr(decode(header), "transfer_id", None)
            if isinstance(tid, str):
                self.send(peer, Failed(self.address, tid, f"KV data could not be sent to {peer}: {error}"))

        return tell

    def forget_peer(self, peer: str) -> None:
        with self.senders_lock:
            sender = self.senders.pop(peer, None)
        if sender is not None:
            sender.close()
        self.forget.put(peer)
        self._wake()

    def _wake(self) -> None:
        with self.wake_lock, contextlib.suppress(zmq.ZMQError):  # closing: nobody to wake
            self.wake_push.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        self.stopped.set()
        self._wake()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.senders_lock:
            for sender in self.senders.values():
                sender.close()
        if self.threads[0].is_alive():
            self.threads[0].join(5)
        with self.wake_lock:
            self.wake_push.close(0)
        self.ctx.destroy(0)

    def _handle(self, msg: Message, payload: memoryview | None) -> None:
        assert self.handler is not None
        try:
            with self.handler_lock:
                self.handler(msg, payload)
        except Exception:  # a bad message must not kill an I/O thread
            logger.exception("handling %s failed", type(msg).__name__)

    # ---- control (ZeroMQ), one thread owns every socket -------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        for sock in [] if self.gate is None else self.gate.sockets:
            poller.register(sock, zmq.POLLIN)
        while not self.stopped.is_set():
            events = dict(poller.poll(200))
            if self.gate is not None:
                self.gate.handle(set(events))
            if self.wake_pull in events:
                while self.wake_pull.poll(0):
                    self.wake_pull.recv()
            if self.router in events:
                while self.router.poll(0):
                    self._receive_one()
            self._flush()
        for sock in self.dealers.values():
            sock.close(0)
        self.router.close(0)
        self.wake_pull.close(0)
        if self.gate is not None:
            self.gate.close()

    def _receive_one(self) -> None:
        frames = self.router.recv_multipart()
        try:
            msg = decode(frames[1])
        except (ValueError, IndexError, TypeError, RecursionError) as e:
            logger.warning("dropping a malformed control message: %s", e)
            return
        self._handle(msg, None)

    def _flush(self) -> None:
        while not self.forget.empty():
            sock = self.dealers.pop(self.forget.get(), None)
            if sock is not None:
                sock.close(0)
        while not self.outbox.empty():
            peer, header = self.outbox.get()
            try:
                self._dealer(peer).send(header, flags=zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("control queue to %s is full; message dropped", peer)
            except (zmq.ZMQError, TypeError) as e:  # an address zmq refuses: this thread serves every peer
                logger.warning("cannot reach %s (%s); message dropped", peer, e)

    def _dealer(self, peer: str) -> zmq.Socket:
        sock = self.dealers.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            auth.make_client(sock, self.secret)
            sock.connect(peer)
            self.dealers[peer] = sock
        return sock

    # ---- data (plain TCP), a thread per incoming connection ---------------------------------------
    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._receive_data, args=(conn,), name="kv-data-recv", daemon=True
            ).start()

    def _receive_data(self, conn: socket.socket) -> None:
        staging = bytearray()
        with conn:
            try:
                auth.challenge_connector(conn, self.secret)
            except OSError as e:  # ChallengeFailed too: nothing from this peer is read or written
                self.data_refused(f"{_peer_name(conn)} failed the challenge ({e})")
                return
            while not self.stopped.is_set():
                try:
                    conn.settimeout(None)  # an idle link may stay quiet for as long as it likes
                    (length,) = _LEN.unpack(_recv_exact(conn, memoryview(bytearray(_LEN.size))))
                    conn.settimeout(RECV_TIMEOUT_S)  # but once a message has begun, it must go on
                    if length > MAX_HEADER_BYTES:
                        raise ValueError(f"a {length}-byte KV data header")
                    msg = decode(bytes(_recv_exact(conn, memoryview(bytearray(length)))))
                except (OSError, ConnectionError, ValueError, TypeError):
                    return  # peer closed or sent garbage: drop the connection
                nbytes = int(getattr(msg, "nbytes", 0))
                views = self.payload_target(msg) if self.payload_target is not None else None
                if views is not None and sum(len(v) for v in views) == nbytes:
                    if not self._receive_in_place(conn, msg, views):
                        return
                    continue
                if views is not None and self.payload_done is not None:
                    self.payload_done(msg, False)  # a target of the wrong size: refuse it
                if nbytes > MAX_STAGED_BYTES:
                    logger.warning("dropping a KV data connection that sent %d bytes for no transfer", nbytes)
                    self._handle(msg, None)  # the connector fails the transfer it names, if any
                    return
                try:
                    if len(staging) < nbytes:
                        staging = bytearray(nbytes)
                    payload = _recv_exact(conn, memoryview(staging)[:nbytes])
                except (OSError, ConnectionError):
                    return
                self._handle(msg, payload)

    def _receive_in_place(self, conn: socket.socket, msg: Message, views: list[memoryview]) -> bool:
        ok = True
        try:
            for view in views:
                _recv_exact(conn, view)
        except (OSError, ConnectionError):
            ok = False
        assert self.payload_done is not None
        with self.handler_lock:
            self.payload_done(msg, ok)
        return ok


def _peer_name(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a peer"


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise ConnectionError("peer closed the KV data connection")
        got += n
    return view


class _DataSender:
    """One peer's outgoing KV stream: a thread writing queued (header, payload) pairs in order."""

    def __init__(
        self, addr: tuple[str, int], failed: Callable[[bytes, OSError], None], secret: ClusterSecret | None
    ) -> None:
        self.addr = addr
        self.failed = failed  # (header, error) of a payload that could not be sent
        self.secret = secret
        self.queue: queue.SimpleQueue[tuple[bytes, Any] | None] = queue.SimpleQueue()
        self.sock: socket.socket | None = None
        threading.Thread(target=self._run, name="kv-data-send", daemon=True).start()

    def put(self, header: bytes, payload: Any) -> None:
        self.queue.put((header, payload))

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            header, payload = item
            for attempt in (1, 2):  # a link the peer closed meanwhile: reconnect and send once more
                try:
                    self._send(header, payload)
                    break
                except OSError as e:
                    self._drop()
                    if attempt == 2:
                        logger.warning(
                            "KV data to %s:%d failed (%s); the transfer fails there", *self.addr, e
                        )
                        self.failed(header, e)
        self._drop()

    def _send(self, header: bytes, payload: Any) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=5)
            auth.answer_listener(self.sock, self.secret)  # raises unless the listener has the secret
            self.sock.settimeout(60)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_LEN.pack(len(header)) + header)
        self.sock.sendall(memoryview(payload).cast("B"))

    def _drop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

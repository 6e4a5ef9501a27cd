"""The KV connector: the one interface the engine and scheduler see for disaggregation.

The scheduler asks two questions: does this request get its KV from elsewhere (`gets_kv_remotely`:
reserve its prompt's blocks, then `start_receive`), and does this request's KV go elsewhere once its
prefill is done (`sends_kv`: then `send_kv` instead of decoding). Everything else (handshake, reserve,
KV bytes, first token, aborts, heartbeats, timeouts) happens here, in the decode side (receiving.py)
and the prefill side (sending.py) that KVConnector is made of, and in the transport, which also picks
how the bytes travel (transport/base.py). This module owns what both sides share: construction, `shut`,
the engine thread's `poll` (timeouts, heartbeats, forgetting ended peers), `request_finished`, the
handshake and the dispatch of every message to its side's `_on_<Message>`.

    decode: add(kv_transfer) -> WAITING -> blocks reserved -> WAITING_FOR_KV -> KV + Done -> RUNNING
    prefill: Reserve -> a local request -> prompt computed, first token sampled -> KVData + Done -> freed

Threads: transport callbacks (`_on_message`) write KV bytes into reserved blocks and queue events
(events.py); the engine thread drains them in `poll`.

Leases (leases.py) keep blocks from reuse while someone other than the engine may touch them: a request
that ends while its transfer holds one keeps its blocks (`request_finished` returns True) until the
lease ends (a ReleaseBlocks event). Which leases each side takes, and when they end, is in its module.
Handshake and liveness bookkeeping per peer is peers.py.

Lock order: the connector's `lock`, then the lease registry's or the peer table's own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.events import AbortPrefill, Event, KVReady, NewPrefill, ReleaseBlocks, TransferFailed
from pdserve.disagg.layer_stream import Streamed
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.receiving import Incoming, ReceiveSide
from pdserve.disagg.sending import Outgoing, SendSide
from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.blocks import pool_block_bytes
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.engine.kv_layout import block_major
from pdserve.engine.request import Request

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0

__all__ = [
    "AbortPrefill",
    "Event",
    "Incoming",
    "KVConnector",
    "KVReady",
    "NewPrefill",
    "Outgoing",
    "ReleaseBlocks",
    "TransferFailed",
]


class KVConnector(ReceiveSide, SendSide):
    def __init__(
        self,
        transport: KVTransport,
        kv_cache: torch.Tensor,  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        layout: dict[str, Any],
        model_name: str,
        transfer_timeout: float = 120.0,
        peer_timeout: float = 5.0,
        shards: ShardedPool | None = None,  # tensor parallel: every rank's part of the pool
    ) -> None:
        self.transport = transport
        self.kv_cache = kv_cache
        self.shards = shards
        self.layout = layout
        self.model_name = model_name
        self.transfer_timeout = transfer_timeout
        self.peer_timeout = peer_timeout
        self.block_bytes = pool_block_bytes(kv_cache, shards)
        self.lock = threading.Lock()
        self.incoming: dict[str, Incoming] = {}
        self.outgoing: dict[str, Outgoing] = {}
        self.refusing: str | None = None  # shut(): why every Reserve is refused
        self.leases = LeaseRegistry(self._blocks_released)
        self.peers = PeerTable(peer_timeout)
        self.staging: dict[str, torch.Tensor] = {}  # decode, GPU pool: pinned buffers bytes land in
        self.sent: dict[str, float] = {}  # transfers whose KV left recently: not "unknown" to a ping
        self.streams: dict[str, Streamed] = {}  # prefill: transfers going out layer by layer this step
        self.transfers_streamed = 0  # of them, those whose every layer went during the step
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None
        self.next_heartbeat = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transfer_seconds: list[float] = []  # drained by metrics
        # a host pool in block-major memory takes KV bytes straight from the socket, a run of blocks per
        # read; device (or sharded, or other-layout) pools take them through a buffer
        blocks_first = block_major(kv_cache)
        host = kv_cache.device.type == "cpu" and shards is None and blocks_first.is_contiguous()
        self.pool_bytes = blocks_first.view(torch.uint8).numpy() if host else None
        try:
            transport.attach_pool(kv_cache, shards)
        except BaseException:
            transport.close()  # its sockets are bound: a transport never closed blocks at exit
            raise
        transport.start(self._on_message, self._payload_target, self._payload_done)

    def close(self) -> None:
        self.transport.close()

    def shut(self, reason: str) -> None:
        """The engine is gone: fail every transfer in progress, both ways, and every Reserve from now on,
        so peers hear it at once (the I/O threads live on: silence would take the transfer timeout)."""
        with self.lock:
            self.refusing = reason
            outgoing, incoming = list(self.outgoing.items()), list(self.incoming.items())
            self.outgoing.clear()
            self.incoming.clear()
        for tid, out in outgoing:
            self.transport.send(out.peer, p.Failed(self.address, tid, reason))
        for tid, inc in incoming:
            self.transport.send(inc.peer, p.Abort(self.address, tid))

    # ---- the scheduler's two questions -------------------------------------------------------------
    @staticmethod
    def gets_kv_remotely(request: Request) -> bool:
        return bool(request.kv_transfer and request.kv_transfer.get("prefill_kv_addr"))

    @staticmethod
    def sends_kv(request: Request) -> bool:
        return bool(request.kv_transfer and request.kv_transfer.get("decode_addr"))

    def request_finished(self, request: Request) -> bool:
        """Called before the request's blocks are freed, on either side. True: keep them until a
        ReleaseBlocks event, because a transfer may still touch them (a lease)."""
        transfer_id = (request.kv_transfer or {}).get("transfer_id")
        if transfer_id is None:
            return False
        streamed = self.streams.pop(transfer_id, None)
        if streamed is not None:  # ended during its streaming step: fence what was queued
            self._write(transfer_id, streamed.peer, streamed.src, streamed.dst, streamed)
        with self.lock:
            incoming = self.incoming.pop(transfer_id, None)
            self.outgoing.pop(transfer_id, None)
            leased = self.leases.finish(transfer_id)
        if incoming is not None:  # decode gave up first: tell prefill to stop
            self.transport.send(incoming.peer, p.Abort(self.address, transfer_id))
        return leased

    def _blocks_released(self, request_id: str) -> None:
        """The lease of a finished request ended (LeaseRegistry's callback)."""
        self.events.put(ReleaseBlocks(request_id))
        self.wake()

    # ---- the engine thread's poll -------------------------------------------------------------------
    def poll(self) -> list[Event]:
        self._tick()
        events: list[Event] = []
        while not self.events.empty():
            events.append(self.events.get())
        return events

    def has_pending(self) -> bool:
        return bool(self.incoming or self.outgoing or self.leases)

    def _tick(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_INTERVAL
        with self.lock:
            self.sent = {t: ts for t, ts in self.sent.items() if now - ts < self.transfer_timeout}
            incoming = list(self.incoming.items())
            outgoing = list(self.outgoing.items())
        self._check_incoming(now, incoming, self.peers.silences(now))
        self._check_outgoing(now, outgoing, self.peers.last_seen())
        self.leases.expire(now, self.transport.peer_gone)  # direct writers gone, or long past deadline
        busy = {inc.peer for _, inc in incoming} | {out.peer for _, out in outgoing} | self.leases.peers()
        self._forget_ended_peers(busy)

    def _forget_ended_peers(self, busy: set[str]) -> None:
        """Let go of what we hold for idle peers whose process has ended (this host's: the transport
        knows their process): their CUDA-IPC pool mappings, NCCL links, sockets and threads. Otherwise a
        prefill keeps them for every decode it ever served, restarted ones included."""
        for peer in self.peers.known():
            if peer not in busy and self.transport.peer_gone(peer):
                logger.info("KV peer %s has ended; forgetting it", peer)
                self.transport.forget_peer(peer)
                self.peers.drop(peer)

    # ---- transport callbacks (I/O threads) ----------------------------------------------------------
    def _on_message(self, msg: p.Message, payload: memoryview | torch.Tensor | None) -> None:
        self.peers.heard_from(msg.sender, time.monotonic())
        handler = getattr(self, f"_on_{type(msg).__name__}", None)
        if handler is not None:
            handler(msg, payload)

    def _on_Handshake(self, msg: p.Handshake, _: object) -> None:  # noqa: N802
        reason = ""
        path: dict[str, Any] = {}
        if msg.model != self.model_name:
            reason = f"model mismatch: decode serves {msg.model!r}, prefill serves {self.model_name!r}"
        elif msg.layout != self.layout:
            reason = f"KV layout mismatch: decode {msg.layout}, prefill {self.layout}"
        else:
            try:
                path = self.transport.accept(msg.sender, msg.kv_offer)
            except ValueError as e:
                reason = str(e)
        self.peers.judge(msg.sender, reason)
        self.transport.send(msg.sender, p.HandshakeAck(self.address, not reason, reason, path))

    def _on_HandshakeAck(self, msg: p.HandshakeAck, _: object) -> None:  # noqa: N802
        if msg.ok:
            self.transport.accepted(msg.sender, msg.kv_path)
        self.peers.judge(msg.sender, "" if msg.ok else msg.reason)
        with self.lock:
            doomed = [t for t, inc in self.incoming.items() if inc.peer == msg.sender] if not msg.ok else []
        if not self.transport.writes_into_pool(msg.sender):  # refused, or a path that sends bytes
            self.leases.release_peer(msg.sender, "direct")
        for tid in doomed:
            self._fail(tid, f"prefill instance {msg.sender} refused the handshake: {msg.reason}")

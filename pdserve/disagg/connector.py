"""The KV connector: the one interface the engine and scheduler see for disaggregation.

The scheduler asks two questions: does this request get its KV from elsewhere (`gets_kv_remotely`:
reserve its prompt's blocks, then `start_receive`), and does this request's KV go elsewhere once its
prefill is done (`sends_kv`: then `send_kv` instead of decoding). Everything else (handshake, reserve,
KV bytes, first token, aborts, heartbeats, timeouts) happens here and in the transport, which also
picks how the bytes travel (transport/base.py).

    decode: add(kv_transfer) -> WAITING -> blocks reserved -> WAITING_FOR_KV -> KV + Done -> RUNNING
    prefill: Reserve -> a local request -> prompt computed, first token sampled -> KVData + Done -> freed

Threads: transport callbacks (`_on_message`) write KV bytes into reserved blocks and queue events
(events.py); the engine thread drains them in `poll`.

Leases (leases.py) keep blocks from reuse while someone other than the engine may touch them: a request
that ends while its transfer holds one keeps its blocks (`request_finished` returns True) until the
lease ends (a ReleaseBlocks event). A "direct" lease expires DIRECT_WRITE_GRACE after the transfer's
deadline; the prefill side never starts a write later than Reserve.timeout after the Reserve, so the
grace only has to cover a stall between that check and the copies being queued on its GPU. Handshake
and liveness bookkeeping per peer is peers.py.

Lock order: the connector's `lock`, then the lease registry's or the peer table's own.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.events import AbortPrefill, Event, KVReady, NewPrefill, ReleaseBlocks, TransferFailed
from pdserve.disagg.layer_stream import Streamed, make_hook
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.blocks import KVBlocks, pinned_bytes, pool_block_bytes, write_blocks
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.engine.kv_layout import block_major
from pdserve.engine.request import Logprob, Request
from pdserve.layers.sampler import SampleResult

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
DIRECT_WRITE_GRACE = 30.0  # seconds past a transfer's deadline before unfenced blocks are freed anyway

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


@dataclass
class Incoming:
    """Decode side: a transfer we reserved blocks for."""

    request_id: str
    peer: str
    block_ids: list[int]
    expected_bytes: int
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    done: p.Done | None = None  # the first token, if it overtook the KV bytes


@dataclass
class Outgoing:
    """Prefill side: a transfer we were asked for."""

    request_id: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    write_by: float = math.inf  # the decode side stops waiting then: write nothing after it


def _outgoing(request: Request) -> tuple[str, str, list[int], list[int]]:
    """Prefill side: a request's transfer id, decode peer, and source and destination blocks."""
    assert request.kv_transfer is not None
    dst = list(request.kv_transfer["block_ids"])
    return (
        str(request.kv_transfer["transfer_id"]),
        str(request.kv_transfer["decode_addr"]),
        request.block_ids[: len(dst)],
        dst,
    )


class KVConnector:
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

    @property
    def address(self) -> str:
        return self.transport.address

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

    # ---- decode side --------------------------------------------------------------------------------
    def start_receive(self, request: Request) -> None:
        """Blocks for the prompt are reserved: ask the prefill instance to fill them."""
        assert request.kv_transfer is not None
        peer = str(request.kv_transfer["prefill_kv_addr"])
        transfer_id = uuid.uuid4().hex
        request.kv_transfer["transfer_id"] = transfer_id
        blocks = list(request.block_ids)
        inc = Incoming(request.request_id, peer, blocks, len(blocks) * self.block_bytes)
        with self.lock:
            self.incoming[transfer_id] = inc
            needs_handshake = self.peers.should_handshake(peer, inc.started)
        if needs_handshake or self.transport.needs_handshake(peer):
            offer = self.transport.offer(peer)
            self.transport.send(peer, p.Handshake(self.address, self.model_name, self.layout, offer))
        if self.transport.writes_into_pool(peer):
            expires = inc.started + self.transfer_timeout + DIRECT_WRITE_GRACE
            self.leases.hold(transfer_id, request.request_id, peer, "direct", expires)
        params = asdict(request.params)
        reserve = p.Reserve(
            self.address, transfer_id, request.prompt_token_ids, params, blocks, self.transfer_timeout
        )
        self.transport.send(peer, reserve)

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

    # ---- prefill side -------------------------------------------------------------------------------
    def _claim(self, transfer_id: str, request_id: str, peer: str) -> bool:
        """From here our writes may land in the peer's blocks: False if aborted or too late."""
        with self.lock:  # from here a heartbeat finds the transfer in `sent`, never "unknown"
            out = self.outgoing.pop(transfer_id, None)
            if out is None:
                return False  # aborted meanwhile
            late = time.monotonic() > out.write_by
            if not late:
                self.sent[transfer_id] = time.monotonic()
                self.leases.hold(transfer_id, request_id, peer, "reading")
        if late:  # the decode side has given up on it: write nothing into its blocks any more
            self.transport.send(peer, p.Failed(self.address, transfer_id, "prefill finished too late"))
        return not late

    def layer_hook(self, requests: list[Request]) -> Callable[[int], None] | None:
        """For a step that completes these requests' prompts: the model's after-layer call that
        streams their KV to direct-write peers (layer_stream.py); None when none can go that way."""
        if self.shards is not None or not self.kv_cache.is_cuda:
            return None
        streams = []
        for request in requests:
            transfer_id, peer, src, dst = _outgoing(request)
            if self.transport.can_write_layers(peer) and self._claim(transfer_id, request.request_id, peer):
                stream = Streamed(peer, src, dst)
                self.streams[transfer_id] = stream
                streams.append(stream)
        return make_hook(self.transport, streams) if streams else None

    def send_kv(self, request: Request, result: SampleResult) -> None:
        """The prompt is computed and its first token sampled: push KV, then the token."""
        transfer_id, peer, src, dst = _outgoing(request)
        streamed = self.streams.pop(transfer_id, None)
        if streamed is None and not self._claim(transfer_id, request.request_id, peer):
            return
        logprob = asdict(result.logprob) if result.logprob is not None else None
        done = p.Done(self.address, transfer_id, result.token_id, logprob, request.num_cached_tokens)
        self._write(transfer_id, peer, src, dst, streamed)
        self.transport.send(peer, done)

    def _write(
        self, transfer_id: str, peer: str, src: list[int], dst: list[int], streamed: Streamed | None
    ) -> None:
        """Send the blocks (or, where every layer went already, only the fence of those writes)."""
        release = lambda: self.leases.release(transfer_id, "reading")  # noqa: E731
        blocks = KVBlocks.of(self.kv_cache, src, release, self.shards)
        blocks.streamed = streamed is not None and streamed.layers == self.layout["num_layers"]
        self.transfers_streamed += blocks.streamed
        self.transport.send(peer, p.KVData(self.address, transfer_id, dst, blocks.nbytes), blocks)
        self.bytes_sent += blocks.nbytes

    def failed_to_start(self, transfer_id: str, peer: str, reason: str, refused: str = "") -> None:
        with self.lock:
            self.outgoing.pop(transfer_id, None)
        self.transport.send(peer, p.Failed(self.address, transfer_id, reason, refused))

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

    def _check_incoming(
        self, now: float, incoming: list[tuple[str, Incoming]], silent: dict[str, float]
    ) -> None:
        by_peer: dict[str, list[str]] = {}
        for tid, inc in incoming:
            if now - inc.started > self.transfer_timeout:
                self._fail(tid, f"KV transfer from {inc.peer} timed out after {self.transfer_timeout:.0f}s")
            elif silent.get(inc.peer, 0.0) > self.peer_timeout:
                self._fail(tid, f"prefill instance {inc.peer} stopped answering")
                self.transport.forget_peer(inc.peer)
            else:
                by_peer.setdefault(inc.peer, []).append(tid)
        for peer, tids in by_peer.items():
            self.peers.pinged(peer, now)
            self.transport.send(peer, p.Heartbeat(self.address, tids))

    def _check_outgoing(
        self, now: float, outgoing: list[tuple[str, Outgoing]], seen: dict[str, float]
    ) -> None:
        # Prefill side: a decode instance that stopped pinging has gone (or aborted): drop its work. Its
        # pings come from its engine thread, so allow for a long step there before giving up.
        for tid, out in outgoing:
            quiet = now - max(seen.get(out.peer, 0.0), out.started)
            late = now - out.started > self.transfer_timeout or now > out.write_by
            if quiet > 4 * self.peer_timeout or late:
                with self.lock:
                    self.outgoing.pop(tid, None)
                self.events.put(AbortPrefill(out.request_id))
                self.transport.send(out.peer, p.Failed(self.address, tid, "dropped by the prefill instance"))

    def _fail(self, transfer_id: str, reason: str) -> None:
        with self.lock:
            inc = self.incoming.pop(transfer_id, None)
        if inc is not None:
            logger.warning("transfer %s failed: %s", transfer_id, reason)
            self.transport.send(inc.peer, p.Abort(self.address, transfer_id))
            self.events.put(TransferFailed(inc.request_id, reason))
            self.wake()

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

    def _on_Reserve(self, msg: p.Reserve, _: object) -> None:  # noqa: N802
        now = time.monotonic()
        write_by = now + msg.timeout if msg.timeout > 0 else math.inf
        refused = self.refusing or self.peers.refusal(msg.sender)
        with self.lock:
            if not refused:
                self.outgoing[msg.transfer_id] = Outgoing(f"kv-{msg.transfer_id}", msg.sender, now, write_by)
        if refused:
            self.transport.send(msg.sender, p.Failed(self.address, msg.transfer_id, refused))
            return
        self.events.put(
            NewPrefill(msg.transfer_id, msg.sender, msg.prompt_token_ids, msg.params, msg.block_ids)
        )
        self.wake()

    def _payload_target(self, msg: p.Message) -> list[memoryview] | None:
        """Where the bytes land: writable views of the reserved blocks, in the payload's order
        (runs of blocks, each all layers, K and V) for a host pool; a pinned buffer for a GPU pool."""
        if not isinstance(msg, p.KVData):
            return None
        tid = msg.transfer_id
        with self.lock:
            inc = self.incoming.get(tid)
            if inc is None or msg.block_ids != inc.block_ids or inc.received:
                return None
            sized = msg.nbytes == len(msg.block_ids) * self.block_bytes
            if sized and not self.leases.try_hold(tid, inc.request_id, inc.peer, "writing"):
                return None  # another payload of this transfer is landing
        if not sized:
            self._fail(tid, f"KV data from {inc.peer}: {msg.nbytes} bytes for {len(msg.block_ids)} blocks")
            return None
        if self.pool_bytes is None:
            try:
                self.staging[tid] = pinned_bytes(msg.nbytes)
            except (RuntimeError, MemoryError) as e:  # pinned memory exhausted: this transfer fails
                self.leases.release(tid, "writing")
                self._fail(tid, f"no staging memory for {msg.nbytes} bytes of KV: {e}")
                return None
            return [self.staging[tid].numpy().data]
        runs: list[tuple[int, int]] = []
        for b in msg.block_ids:
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        pool = self.pool_bytes  # [blocks, layers, 2, ...] as bytes, contiguous
        return [pool[a:b].data.cast("B") for a, b in runs]

    def _payload_done(self, msg: p.Message, ok: bool) -> None:
        """All of a payload's bytes landed in `_payload_target`'s views (or the stream broke off)."""
        assert isinstance(msg, p.KVData)
        tid = msg.transfer_id
        staging = self.staging.pop(tid, None)
        with self.lock:
            inc = self.incoming.get(tid)
        try:
            if ok and inc is not None and staging is not None:  # the "writing" lease holds the blocks
                write_blocks(self.kv_cache, msg.block_ids, staging, self.shards)
        except RuntimeError as e:  # e.g. a CUDA error copying in: this transfer fails, its blocks come back
            ok = False
            logger.warning("writing KV of transfer %s failed: %s", tid, e)
        finally:
            self.leases.release(tid, "writing")
        if inc is not None and not ok:
            self._fail(tid, f"KV data from {inc.peer} broke off")
        elif ok:
            self._received(msg)

    def _on_KVData(self, msg: p.KVData, payload: memoryview | torch.Tensor | None) -> None:  # noqa: N802
        if msg.written:  # the fence of a direct write: it is complete, nothing more will land
            self._received(msg)
            self.leases.release(msg.transfer_id, "direct")
            return
        with self.lock:  # held while writing: the blocks cannot be freed under us
            inc = self.incoming.get(msg.transfer_id)
            if inc is None or payload is None or not set(msg.block_ids) <= set(inc.block_ids):
                return
            sized = _nbytes(payload) == msg.nbytes == len(msg.block_ids) * self.block_bytes
            if sized:
                write_blocks(self.kv_cache, msg.block_ids, payload, self.shards)
        if not sized:
            self._fail(msg.transfer_id, f"KV data from {inc.peer}: {_nbytes(payload)} bytes, {msg.block_ids}")
            return
        self._received(msg)

    def _received(self, msg: p.KVData) -> None:
        """`msg.nbytes` of the transfer's KV are in its blocks; ready once all are, and Done came."""
        with self.lock:
            inc = self.incoming.get(msg.transfer_id)
            if inc is None:
                return
            inc.received += msg.nbytes
            self.bytes_received += msg.nbytes
            ready = inc.done is not None and inc.received == inc.expected_bytes
            if ready:
                del self.incoming[msg.transfer_id]
        if ready and inc.done is not None:
            self._ready(msg.transfer_id, inc, inc.done)

    def _on_Done(self, msg: p.Done, _: object) -> None:  # noqa: N802
        with self.lock:
            inc = self.incoming.get(msg.transfer_id)
            if inc is None:
                return
            if inc.received < inc.expected_bytes:  # the bytes are still on their way (another channel)
                inc.done = msg
                return
            del self.incoming[msg.transfer_id]
        if inc.received != inc.expected_bytes:
            reason = f"KV size mismatch: {inc.received} of {inc.expected_bytes} bytes arrived"
            self.events.put(TransferFailed(inc.request_id, reason))
            self.wake()
            return
        self._ready(msg.transfer_id, inc, msg)

    def _ready(self, tid: str, inc: Incoming, msg: p.Done) -> None:
        self.leases.drop(tid)  # every byte is in: nobody writes into these blocks any more
        self.transfer_seconds.append(time.monotonic() - inc.started)
        lp = Logprob(**msg.logprob) if msg.logprob else None
        if lp is not None:
            lp.top = [(int(t), float(v)) for t, v in lp.top]
        self.events.put(KVReady(inc.request_id, SampleResult(msg.token_id, lp), msg.num_cached_tokens))
        self.wake()

    def _on_Failed(self, msg: p.Failed, _: object) -> None:  # noqa: N802
        with self.lock:
            inc = self.incoming.pop(msg.transfer_id, None)
        self.leases.release(msg.transfer_id, "direct")  # the prefill writes nothing (more) of it
        if inc is not None:
            self.events.put(TransferFailed(inc.request_id, msg.reason, str(msg.refused)))
            self.wake()

    def _on_Abort(self, msg: p.Abort, _: object) -> None:  # noqa: N802
        with self.lock:
            out = self.outgoing.pop(msg.transfer_id, None)
            reading = msg.transfer_id in self.leases
        if out is not None:
            self.events.put(AbortPrefill(out.request_id))
            self.wake()
        if not reading:  # a fence: nothing of this transfer will be written (one in flight fences itself)
            self.transport.send(msg.sender, p.Failed(self.address, msg.transfer_id, "aborted"))

    def _on_Heartbeat(self, msg: p.Heartbeat, _: object) -> None:  # noqa: N802
        with self.lock:
            unknown = [t for t in msg.transfer_ids if t not in self.outgoing and t not in self.sent]
        self.transport.send(msg.sender, p.Pong(self.address, unknown))

    def _on_Pong(self, msg: p.Pong, _: object) -> None:  # noqa: N802
        if msg.unknown_transfer_ids:
            self.peers.forget(msg.sender)  # a restarted peer: shake hands again
        for tid in msg.unknown_transfer_ids:
            self._fail(tid, f"prefill instance {msg.sender} lost the request (restarted?)")
            self.leases.release(tid, "direct")  # it has never heard of the transfer: it will not write


def _nbytes(payload: memoryview | torch.Tensor) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return len(payload)

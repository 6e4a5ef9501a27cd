"""The connector's decode side: a request whose KV comes from a prefill instance.

    start_receive: a Handshake (first time, or the transport asks) and a Reserve for its blocks
    KVData: the bytes are in those blocks (a byte stream landed through `_payload_target` and
            `_payload_done`, a payload handed over whole, or the fence of writes into our pool)
    Done: the first token; with every byte in too (either order) -> KVReady -> RUNNING
    Failed from the peer -> TransferFailed; a refused handshake, a Pong that does not know the
    transfer, bytes of the wrong size or broken off, a timeout, a silent peer -> `_fail`:
    TransferFailed, and an Abort to the peer

Threads: transport callbacks write KV bytes into reserved blocks (under the connector's lock, or,
for a byte stream, under a "writing" lease while it lands) and queue events; the engine thread's
`poll` runs `_check_incoming`: timeouts, and a Heartbeat to each prefill instance still owing KV.

Where the peer writes into our pool itself (a "direct" path), `start_receive` holds a "direct" lease
on the blocks. It ends at the writer's fence (KVData.written, or Failed), when the writer cannot
write any more (it refused the handshake or picked a path that sends bytes, it never heard of the
transfer, or its process is gone), once every byte is in, or DIRECT_WRITE_GRACE after the transfer's
deadline: the prefill side never starts a write later than Reserve.timeout after the Reserve, so
the grace only has to cover a stall between that check and the copies being queued on its GPU.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.events import KVReady, TransferFailed
from pdserve.disagg.state import ConnectorState
from pdserve.disagg.transport.blocks import pinned_bytes, write_blocks
from pdserve.engine.request import Logprob, Request
from pdserve.engine.sampler import SampleResult

logger = logging.getLogger(__name__)

DIRECT_WRITE_GRACE = 30.0  # seconds past a transfer's deadline before unfenced blocks are freed anyway


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


class ReceiveSide(ConnectorState):
    """Decode side of KVConnector: asks for KV, lands it in reserved blocks, reports it ready."""

    model_name: str
    block_bytes: int
    incoming: dict[str, Incoming]
    staging: dict[str, torch.Tensor]
    pool_bytes: np.ndarray | None
    bytes_received: int
    transfer_seconds: list[float]

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

    def _fail(self, transfer_id: str, reason: str) -> None:
        with self.lock:
            inc = self.incoming.pop(transfer_id, None)
        if inc is not None:
            logger.warning("transfer %s failed: %s", transfer_id, reason)
            self.transport.send(inc.peer, p.Abort(self.address, transfer_id))
            self.events.put(TransferFailed(inc.request_id, reason))
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

"""The connector's decode side: a request whose KV comes from a prefill instance.

    start: a Handshake (first time, or the transport asks) and a Reserve for its blocks (those after
           the prompt's prefix this instance caches already: `cached_blocks`, never sent)
    KVData: the bytes are in those blocks (a byte stream landed through `payload_target` and
            `payload_done`, a payload handed over whole, or the fence of writes into our pool)
    Done: the first token; with every byte in too (either order) -> Activate -> RUNNING
    Failed from the peer -> Fail; a refused handshake, a Pong that does not know the
    transfer, bytes of the wrong size or broken off, a timeout, a silent peer -> `_fail`:
    Fail, and an Abort to the peer

Threads: transport callbacks write KV bytes into reserved blocks (under the Receiver's lock, or,
for a byte stream, under a "writing" lease while it lands) and queue actions (Activate, Fail); the
engine thread's `poll` runs `check`: timeouts, and a Heartbeat to each prefill instance still owing KV.
The Receiver knows requests only by id: which transfer each waits on is its own record (`transfer_of`).

Every message is judged against the transfer it names. One naming a transfer we do not wait on, or
sent by another instance than the transfer's prefill, is dropped (logged, counted: Link.drop). From
the transfer's prefill, anything but bytes for reserved blocks not landed yet, of exactly their size,
a fence of all of them on a path that writes into our pool, and a first token (and logprobs) in the
vocabulary fails the transfer: the request gets an error and its blocks are freed, so no token is
ever computed from blocks that were not written (`Incoming.landed` counts blocks, not bytes).

Where the peer writes into our pool itself (a "direct" path), `start` holds a "direct" lease
on the blocks. It ends at the writer's fence (KVData.written, or Failed), when the writer cannot
write any more (it refused the handshake or picked a path that sends bytes, it never heard of the
transfer, or its process is gone), once every byte is in, or DIRECT_WRITE_GRACE after the transfer's
deadline: the prefill side never starts a write later than Reserve.timeout after the Reserve, so
the grace only has to cover a stall between that check and the copies being queued on its GPU.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.actions import Activate, Fail
from pdserve.disagg.handoff import FirstToken, FromPrefill
from pdserve.disagg.link import Link
from pdserve.disagg.transport.blocks import pinned_bytes, write_blocks
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.kv_layout import block_major

logger = logging.getLogger(__name__)

DIRECT_WRITE_GRACE = 30.0  # seconds past a transfer's deadline before unfenced blocks are freed anyway


@dataclass
class Incoming:
    """Decode side: a transfer we reserved blocks for."""

    request_id: str
    peer: str
    block_ids: list[int]
    expected_bytes: int
    num_prompt_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    landed: set[int] = field(default_factory=set)  # the blocks whose bytes are in
    done: p.Done | None = None  # the first token, if it overtook the KV bytes

    @property
    def complete(self) -> bool:
        """Every reserved block's bytes are in (block ids of one transfer are distinct: our pool's)."""
        return len(self.landed) == len(self.block_ids)


class Receiver:
    """Decode side of the connector: asks for KV, lands it in reserved blocks, reports it ready."""

    def __init__(
        self,
        link: Link,
        kv_cache: torch.Tensor,  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        shards: ShardedPool | None,
        block_bytes: int,
    ) -> None:
        self.link = link
        self.kv_cache = kv_cache
        self.shards = shards
        self.block_bytes = block_bytes
        self.lock = threading.Lock()
        self.incoming: dict[str, Incoming] = {}  # by transfer id
        self.transfer_of: dict[str, str] = {}  # request id -> the transfer it waits on, until it ends
        self.handshakes: Counter[str] = Counter()  # peer -> handshakes sent it and not answered yet
        self.staging: dict[str, torch.Tensor] = {}  # GPU pool: pinned buffers bytes land in
        self.bytes_received = 0
        self.transfer_seconds: list[float] = []  # drained by metrics
        # a host pool in block-major memory takes KV bytes straight from the socket, a run of blocks per
        # read; device (or sharded, or other-layout) pools take them through a buffer
        blocks_first = block_major(kv_cache)
        host = kv_cache.device.type == "cpu" and shards is None and blocks_first.is_contiguous()
        self.pool_bytes: np.ndarray | None = blocks_first.view(torch.uint8).numpy() if host else None

    def start(
        self,
        request_id: str,
        source: FromPrefill,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        block_ids: list[int],
        cached_blocks: int = 0,
        num_output_tokens: int = 0,
    ) -> None:
        """Blocks for the prompt after its first `cached_blocks` (this instance has their KV already)
        are reserved: ask the prefill instance to fill them."""
        link, peer = self.link, source.prefill_kv_addr
        transfer_id = uuid.uuid4().hex
        blocks = list(block_ids)
        inc = Incoming(request_id, peer, blocks, len(blocks) * self.block_bytes, len(prompt_token_ids))
        with self.lock:
            self.incoming[transfer_id] = inc
            self.transfer_of[request_id] = transfer_id
            needs_handshake = link.peers.should_handshake(peer, inc.started)
        if needs_handshake or link.transport.needs_handshake(peer):
            offer = link.transport.offer(peer)
            with self.lock:
                self.handshakes[peer] += 1
            link.transport.send(peer, p.Handshake(link.address, link.model_name, link.layout, offer))
        if link.transport.writes_into_pool(peer):
            expires = inc.started + link.transfer_timeout + DIRECT_WRITE_GRACE
            link.leases.hold(transfer_id, request_id, peer, "direct", expires)
        reserve = p.Reserve(
            link.address,
            transfer_id,
            list(prompt_token_ids),
            params,
            blocks,
            link.transfer_timeout,
            cached_blocks,
        )
        reserve.trace_context = source.trace_context  # the prefill's span joins the request's trace
        reserve.num_output_tokens = num_output_tokens
        link.transport.send(peer, reserve)

    def finished(self, request_id: str) -> bool:
        """The request ended (before its blocks are freed). True: a lease keeps them."""
        with self.lock:
            transfer_id = self.transfer_of.pop(request_id, None)
            if transfer_id is None:
                return False
            incoming = self.incoming.pop(transfer_id, None)
            leased = self.link.leases.finish(transfer_id)
        if incoming is not None:  # decode gave up first: tell prefill to stop
            self.link.transport.send(incoming.peer, p.Abort(self.link.address, transfer_id))
        return leased

    def shut(self) -> None:
        """The engine is gone: abort every transfer still owed to us."""
        with self.lock:
            incoming = list(self.incoming.items())
            self.incoming.clear()
        for tid, inc in incoming:
            self.link.transport.send(inc.peer, p.Abort(self.link.address, tid))

    def busy_peers(self) -> set[str]:
        with self.lock:
            return {inc.peer for inc in self.incoming.values()}

    def check(self, now: float) -> None:
        """The engine thread, now and then: time out transfers, give up on silent peers, ping the rest."""
        link = self.link
        with self.lock:
            incoming = list(self.incoming.items())
        silent = link.peers.silences(now)
        by_peer: dict[str, list[str]] = {}
        for tid, inc in incoming:
            if now - inc.started > link.transfer_timeout:
                self._fail(tid, f"KV transfer from {inc.peer} timed out after {link.transfer_timeout:.0f}s")
            elif silent.get(inc.peer, 0.0) > link.peer_timeout:
                self._fail(tid, f"prefill instance {inc.peer} stopped answering")
                link.transport.forget_peer(inc.peer)
            else:
                by_peer.setdefault(inc.peer, []).append(tid)
        for peer, tids in by_peer.items():
            link.peers.pinged(peer, now)
            link.transport.send(peer, p.Heartbeat(link.address, tids))

    def _fail(self, transfer_id: str, reason: str) -> None:
        with self.lock:
            inc = self.incoming.pop(transfer_id, None)
        if inc is not None:
            logger.warning("transfer %s failed: %s", transfer_id, reason)
            self.link.transport.send(inc.peer, p.Abort(self.link.address, transfer_id))
            self.link.actions.put(Fail(inc.request_id, reason))

    # ---- transport callbacks (I/O threads) ----------------------------------------------------------
    def _ours(self, msg: p.KVData | p.Done) -> Incoming | None:
        """The transfer `msg` names, if we wait on it and `msg` comes from its prefill instance (else
        the message is dropped). Called with the lock held."""
        inc = self.incoming.get(msg.transfer_id)
        if inc is None:
            self.link.drop("unknown_transfer", msg)
        elif inc.peer != msg.sender:
            self.link.drop("wrong_sender", msg, f": transfer {msg.transfer_id} is {inc.peer}'s")
            return None
        return inc

    def on_handshake_ack(self, msg: p.HandshakeAck) -> None:
        """The answer to a handshake we sent (nobody else picks the path KV takes into our pool)."""
        link = self.link
        with self.lock:
            asked = self.handshakes[msg.sender] > 0
            if asked:
                self.handshakes[msg.sender] -= 1
            else:
                self.handshakes.pop(msg.sender, None)
        if not asked:
            link.drop("unasked", msg)
            return
        reason = "" if msg.ok else msg.reason or "refused"
        if msg.ok:
            try:
                link.transport.accepted(msg.sender, msg.kv_path)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # a path we cannot read
                reason = f"unusable KV path {msg.kv_path!r}: {e}"
        link.peers.judge(msg.sender, reason)
        with self.lock:
            doomed = [t for t, inc in self.incoming.items() if inc.peer == msg.sender] if reason else []
        if not link.transport.writes_into_pool(msg.sender):  # refused, or a path that sends bytes
            link.leases.release_peer(msg.sender, "direct")
        for tid in doomed:
            self._fail(tid, f"prefill instance {msg.sender} refused the handshake: {reason}")

    def payload_target(self, msg: p.Message) -> list[memoryview] | None:
        """Where the bytes land: writable views of the reserved blocks, in the payload's order
        (runs of blocks, each all layers, K and V) for a host pool; a pinned buffer for a GPU pool.
        None (the bytes go through `on_kv_data`, which judges them): anything but all of the blocks
        of a transfer we wait on, from its prefill instance, none of them landed yet."""
        if not isinstance(msg, p.KVData):
            return None
        tid = msg.transfer_id
        with self.lock:
            inc = self.incoming.get(tid)
            if inc is None or inc.peer != msg.sender or msg.block_ids != inc.block_ids or inc.landed:
                return None
            sized = msg.nbytes == len(msg.block_ids) * self.block_bytes
            if sized and not self.link.leases.try_hold(tid, inc.request_id, inc.peer, "writing"):
                return None  # another payload of this transfer is landing
        if not sized:
            self._fail(tid, f"KV data from {inc.peer}: {msg.nbytes} bytes for {len(msg.block_ids)} blocks")
            return None
        if self.pool_bytes is None:
            try:
                self.staging[tid] = pinned_bytes(msg.nbytes)
            except (RuntimeError, MemoryError) as e:  # pinned memory exhausted: this transfer fails
                self.link.leases.release(tid, "writing")
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

    def payload_done(self, msg: p.Message, ok: bool) -> None:
        """All of a payload's bytes landed in `payload_target`'s views (or the stream broke off)."""
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
            self.link.leases.release(tid, "writing")
        if inc is not None and not ok:
            self._fail(tid, f"KV data from {inc.peer} broke off")
        elif ok:
            self._landed(msg)

    def on_kv_data(self, msg: p.KVData, payload: memoryview | torch.Tensor | None) -> None:
        """Bytes for some of a transfer's blocks (all of them, or a chunk of them: nccl), or the fence of
        a direct write. Anything but bytes for reserved blocks not yet landed, of their exact size,
        from the transfer's prefill instance, fails the transfer: no block is left half written."""
        if msg.written:
            self._fenced(msg)
            return
        with self.lock:  # held while writing: the blocks cannot be freed under us
            inc = self._ours(msg)
            if inc is None:
                return
            problem = self._unfit(inc, msg, payload)
            if not problem and payload is not None:
                write_blocks(self.kv_cache, msg.block_ids, payload, self.shards)
        if problem:
            self._fail(msg.transfer_id, f"KV data from {inc.peer}: {problem}")
            return
        self._landed(msg)

    def _unfit(self, inc: Incoming, msg: p.KVData, payload: memoryview | torch.Tensor | None) -> str:
        """Why these bytes cannot land in the transfer's blocks ("": they can)."""
        blocks = set(msg.block_ids)
        if payload is None:
            return "a KVData without bytes"
        if len(blocks) != len(msg.block_ids) or not blocks <= set(inc.block_ids) or blocks & inc.landed:
            return f"blocks {msg.block_ids[:8]} are not reserved blocks still owed"
        size = _nbytes(payload)
        if not size == msg.nbytes == len(msg.block_ids) * self.block_bytes:
            return f"{size} bytes (said {msg.nbytes}) for {len(msg.block_ids)} blocks"
        return ""

    def _fenced(self, msg: p.KVData) -> None:
        """KVData(written=True): the prefill instance says it wrote every block into our pool itself.
        Taken only from the transfer's prefill, on a path that writes into our pool, for exactly the
        reserved blocks; otherwise the transfer fails (the blocks are never read as if written)."""
        tid = msg.transfer_id
        with self.lock:
            inc = self.incoming.get(tid)
        if inc is None:  # the request ended first (aborted): the fence still ends the writer's lease
            if tid not in self.link.leases:
                self.link.drop("unknown_transfer", msg)
            self.link.leases.release(tid, "direct", msg.sender)
            return
        if inc.peer != msg.sender:
            self.link.drop("wrong_sender", msg, f": transfer {tid} is {inc.peer}'s")
            return
        if not self.link.transport.writes_into_pool(msg.sender):
            self._fail(tid, f"{msg.sender} claims to have written KV into our pool; its path sends bytes")
        elif msg.block_ids != inc.block_ids or msg.nbytes != inc.expected_bytes or inc.landed:
            self._fail(tid, f"{msg.sender} fenced blocks {msg.block_ids[:8]} ({msg.nbytes} bytes)")
        else:
            self._landed(msg)
            self.link.leases.release(tid, "direct", msg.sender)

    def _landed(self, msg: p.KVData) -> None:
        """`msg`'s blocks of the transfer are written; ready once all are, and Done came."""
        with self.lock:
            inc = self.incoming.get(msg.transfer_id)
            if inc is None:
                return
            inc.landed.update(msg.block_ids)
            inc.received += msg.nbytes
            self.bytes_received += msg.nbytes
            ready = inc.done is not None and inc.complete
            if ready:
                del self.incoming[msg.transfer_id]
        if ready and inc.done is not None:
            self._ready(msg.transfer_id, inc, inc.done)

    def on_done(self, msg: p.Done) -> None:
        with self.lock:
            inc = self._ours(msg)
            if inc is None:
                return
            problem = self._bad_first_token(inc, msg)
            if not problem and not inc.complete:  # the bytes are still on their way (another channel)
                inc.done = msg
                return
            if not problem:
                del self.incoming[msg.transfer_id]
        if problem:
            self._fail(msg.transfer_id, f"prefill instance {msg.sender} sent {problem}")
            return
        self._ready(msg.transfer_id, inc, msg)

    def _bad_first_token(self, inc: Incoming, msg: p.Done) -> str:
        """What is wrong with a Done's first token for this transfer ("": nothing)."""
        vocab = self.link.vocab_size
        top = [t[0] for t in msg.logprob.get("top", [])] if msg.logprob else []
        ids = [msg.token_id, *top] + ([msg.logprob["token_id"]] if msg.logprob else [])
        if vocab and any(t >= vocab for t in ids):
            return f"a first token outside the vocabulary of {vocab}: {msg.token_id}"
        if msg.logprob and msg.logprob["token_id"] != msg.token_id:
            return "a logprob of another token than the first token"
        if msg.num_cached_tokens > inc.num_prompt_tokens:
            return f"{msg.num_cached_tokens} cached tokens of a {inc.num_prompt_tokens}-token prompt"
        return ""

    def _ready(self, tid: str, inc: Incoming, msg: p.Done) -> None:
        self.link.leases.drop(tid)  # every byte is in: nobody writes into these blocks any more
        with self.lock:  # the request is local from here: nothing of the transfer is left to end
            if self.transfer_of.get(inc.request_id) == tid:
                del self.transfer_of[inc.request_id]
        self.transfer_seconds.append(time.monotonic() - inc.started)
        first = FirstToken.from_wire(msg.token_id, msg.logprob)
        self.link.actions.put(Activate(inc.request_id, first, msg.num_cached_tokens))

    def on_failed(self, msg: p.Failed) -> None:
        tid = msg.transfer_id
        with self.lock:
            inc = self.incoming.get(tid)
            if inc is not None and inc.peer == msg.sender:
                del self.incoming[tid]
        if inc is not None and inc.peer != msg.sender:
            self.link.drop("wrong_sender", msg, f": transfer {tid} is {inc.peer}'s")
            return
        if inc is None and tid not in self.link.leases:
            self.link.drop("unknown_transfer", msg)
        self.link.leases.release(tid, "direct", msg.sender)  # the prefill writes nothing (more) of it
        if inc is not None:
            self.link.actions.put(Fail(inc.request_id, msg.reason, msg.refused))

    def on_pong(self, msg: p.Pong) -> None:
        if msg.unknown_transfer_ids:
            self.link.peers.forget(msg.sender)  # a restarted peer: shake hands again
        with self.lock:
            named = {t: self.incoming[t].peer for t in msg.unknown_transfer_ids if t in self.incoming}
        lost = [t for t, peer in named.items() if peer == msg.sender]
        if len(lost) < len(named):
            self.link.drop("wrong_sender", msg, ": it names transfers of other prefill instances")
        for tid in lost:
            self._fail(tid, f"prefill instance {msg.sender} lost the request (restarted?)")
            self.link.leases.release(tid, "direct", msg.sender)  # it never heard of it: it will not write


def _nbytes(payload: memoryview | torch.Tensor) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return len(payload)

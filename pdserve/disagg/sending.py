"""The connector's prefill side: a request whose KV goes to a decode instance once its prefill is done.

    Handshake -> HandshakeAck: the model and KV layout must match; the transport picks the path
    Reserve -> Outgoing and a StartPrefill action (the engine runs the whole prompt as a local request,
               and sends KV only for the blocks after the decode's `cached_blocks`);
               refused (shut, or a peer whose handshake failed) -> Failed to the peer; refused as
               "invalid" (token ids outside the vocabulary, destination blocks that repeat or do not
               fit the prompt after its cached blocks, a transfer id in use) -> Failed(refused="invalid"),
               no StartPrefill;
               the engine refuses what only it can judge (sampling parameters, context) the same way
    prompt computed, first token sampled -> send_kv: KVData (the blocks, or only the fence of writes
               that went layer by layer, layer_stream.py), then Done
    Abort (from the transfer's decode instance only), a decode instance gone quiet, or past its
               deadline -> Cancel (and Failed to the peer)
    Heartbeat -> Pong, naming the transfers we know nothing of (neither waiting nor recently sent)

Claiming a transfer (`_claim`, in send_kv or when a streaming step is launched) moves it from
`outgoing` to `sent` and takes a "reading" lease on the request's blocks, held until the transport no
longer reads them. Nothing is written into the decode instance's blocks later than Reserve.timeout
after the Reserve: it has given up on them by then. The Sender sees requests only as PromptKV values.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.actions import Cancel, StartPrefill
from pdserve.disagg.compat import layout_mismatch
from pdserve.disagg.handoff import FirstToken, PromptKV, ToDecode
from pdserve.disagg.layer_stream import Streamed, make_hook
from pdserve.disagg.link import Link
from pdserve.disagg.transport.blocks import KVBlocks
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.observability import tracing

logger = logging.getLogger(__name__)


@dataclass
class Outgoing:
    """Prefill side: a transfer we were asked for."""

    request_id: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    write_by: float = math.inf  # the decode side stops waiting then: write nothing after it


class Sender:
    """Prefill side of the connector: takes Reserves, has their prompts computed, sends the KV."""

    def __init__(
        self,
        link: Link,
        kv_cache: torch.Tensor,  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        shards: ShardedPool | None,
    ) -> None:
        self.link = link
        self.kv_cache = kv_cache
        self.shards = shards
        self.lock = threading.Lock()
        self.outgoing: dict[str, Outgoing] = {}  # by transfer id
        self.sent: dict[str, float] = {}  # transfers whose KV left recently: not "unknown" to a ping
        self.streams: dict[str, Streamed] = {}  # transfers going out layer by layer this step
        self.transfers_streamed = 0  # of them, those whose every layer went during the step
        self.bytes_sent = 0
        self.refusing: str | None = None  # shut(): why every Reserve is refused

    def shut(self, reason: str) -> None:
        """The engine is gone: fail every transfer we owe, and every Reserve from now on."""
        with self.lock:
            self.refusing = reason
            outgoing = list(self.outgoing.items())
            self.outgoing.clear()
        for tid, out in outgoing:
            self.link.transport.send(out.peer, p.Failed(self.link.address, tid, reason))

    def refuse(self, reason: str) -> None:
        """Refuse every Reserve from now on (Failed `reason`), and go on with the transfers we owe."""
        with self.lock:
            self.refusing = self.refusing or reason

    def finished(self, transfer_id: str) -> bool:
        """The request ended (before its blocks are freed). True: a lease keeps them."""
        streamed = self.streams.pop(transfer_id, None)
        if streamed is not None:  # ended during its streaming step: fence what was queued
            self._write(transfer_id, streamed.peer, streamed.src, streamed.dst, streamed)
        with self.lock:
            self.outgoing.pop(transfer_id, None)
            return self.link.leases.finish(transfer_id)

    def busy_peers(self) -> set[str]:
        with self.lock:
            return {out.peer for out in self.outgoing.values()}

    # ---- the engine thread --------------------------------------------------------------------------
    def _claim(self, transfer_id: str, request_id: str, peer: str) -> bool:
        """From here our writes may land in the peer's blocks: False if aborted or too late."""
        with self.lock:  # from here a heartbeat finds the transfer in `sent`, never "unknown"
            out = self.outgoing.pop(transfer_id, None)
            if out is None:
                return False  # aborted meanwhile
            late = time.monotonic() > out.write_by
            if not late:
                self.sent[transfer_id] = time.monotonic()
                self.link.leases.hold(transfer_id, request_id, peer, "reading")
        if late:  # the decode side has given up on it: write nothing into its blocks any more
            self.link.transport.send(
                peer, p.Failed(self.link.address, transfer_id, "prefill finished too late")
            )
        return not late

    def layer_hook(self, prompts: list[PromptKV]) -> Callable[[int], None] | None:
        """For a step that completes these prompts: the model's after-layer call that streams their KV
        to direct-write peers (layer_stream.py); None when none can go that way."""
        if self.shards is not None or not self.kv_cache.is_cuda:
            return None
        streams = []
        for kv in prompts:
            tid, peer = kv.target.transfer_id, kv.target.decode_addr
            if self.link.transport.can_write_layers(peer) and self._claim(tid, kv.request_id, peer):
                stream = Streamed(peer, list(kv.block_ids), list(kv.target.block_ids))
                self.streams[tid] = stream
                streams.append(stream)
        return make_hook(self.link.transport, streams) if streams else None

    def send_kv(self, kv: PromptKV, first: FirstToken, num_cached_tokens: int) -> None:
        """The prompt is computed and its first token sampled: push KV, then the token."""
        tid, peer = kv.target.transfer_id, kv.target.decode_addr
        streamed = self.streams.pop(tid, None)
        if streamed is None and not self._claim(tid, kv.request_id, peer):
            return
        done = p.Done(self.link.address, tid, first.token_id, first.to_wire(), num_cached_tokens)
        try:
            self._write(tid, peer, list(kv.block_ids), list(kv.target.block_ids), streamed)
        except Exception as e:  # noqa: BLE001 - this transfer fails, not the engine thread
            logger.exception("sending the KV of transfer %s to %s failed", tid, peer)
            self.link.leases.release(tid, "reading")
            self.link.transport.send(peer, p.Failed(self.link.address, tid, f"sending KV failed: {e}"))
            return
        self.link.transport.send(peer, done)
        tracing.record("prefill.request", kv.target.trace_context, kv.target.reserved_at, transfer_id=tid)

    def _write(
        self, transfer_id: str, peer: str, src: list[int], dst: list[int], streamed: Streamed | None
    ) -> None:
        """Send the blocks (or, where every layer went already, only the fence of those writes)."""
        release = lambda: self.link.leases.release(transfer_id, "reading")  # noqa: E731
        blocks = KVBlocks.of(self.kv_cache, src, release, self.shards)
        blocks.streamed = streamed is not None and streamed.layers == self.link.layout["num_layers"]
        self.transfers_streamed += blocks.streamed
        self.link.transport.send(peer, p.KVData(self.link.address, transfer_id, dst, blocks.nbytes), blocks)
        self.bytes_sent += blocks.nbytes

    def failed_to_start(self, target: ToDecode, reason: str, refused: str = "") -> None:
        if refused == "invalid":  # the engine found the Reserve's prompt or parameters wrong
            logger.warning("refusing Reserve %s from %s: %s", target.transfer_id, target.decode_addr, reason)
            self.link.dropped.add("invalid")
        with self.lock:
            self.outgoing.pop(target.transfer_id, None)
        self.link.transport.send(
            target.decode_addr, p.Failed(self.link.address, target.transfer_id, reason, refused)
        )

    def check(self, now: float) -> None:
        """The engine thread, now and then: forget old sends; a decode instance that stopped pinging
        has gone (or aborted): drop its work. Its pings come from its engine thread, so allow for a
        long step there before giving up."""
        link = self.link
        seen = link.peers.last_seen()
        with self.lock:
            self.sent = {t: ts for t, ts in self.sent.items() if now - ts < link.transfer_timeout}
            outgoing = list(self.outgoing.items())
        for tid, out in outgoing:
            quiet = now - max(seen.get(out.peer, 0.0), out.started)
            late = now - out.started > link.transfer_timeout or now > out.write_by
            if quiet > 4 * link.peer_timeout or late:
                with self.lock:
                    self.outgoing.pop(tid, None)
                link.actions.put(Cancel(out.request_id))
                link.transport.send(out.peer, p.Failed(link.address, tid, "dropped by the prefill instance"))

    # ---- transport callbacks (I/O threads) ----------------------------------------------------------
    def on_handshake(self, msg: p.Handshake) -> None:
        link = self.link
        reason = ""
        path: dict[str, Any] = {}
        if msg.model != link.model_name:
            reason = f"model mismatch: decode serves {msg.model!r}, prefill serves {link.model_name!r}"
        elif msg.layout != link.layout:
            reason = layout_mismatch(msg.layout, link.layout)
        else:
            try:
                path = link.transport.accept(msg.sender, msg.kv_offer)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # none fits, or an offer askew
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        link.peers.judge(msg.sender, reason)
        link.transport.send(msg.sender, p.HandshakeAck(link.address, not reason, reason, path))

    def on_reserve(self, msg: p.Reserve) -> None:
        link = self.link
        now = time.monotonic()
        write_by = now + msg.timeout if msg.timeout > 0 else math.inf
        target = ToDecode(
            msg.transfer_id,
            msg.sender,
            tuple(msg.block_ids),
            cached_blocks=msg.cached_blocks,
            trace_context=msg.trace_context,
            reserved_at=now,
        )
        prefill = StartPrefill(target, msg.prompt_token_ids, msg.params, msg.num_output_tokens)
        refused = self.refusing or link.peers.refusal(msg.sender)
        with self.lock:
            invalid = "" if refused else self._invalid(msg)
            if not refused and not invalid:
                self.outgoing[msg.transfer_id] = Outgoing(prefill.request_id, msg.sender, now, write_by)
        if invalid:  # the decode instance answers its client 400: no other prefill would take it
            link.drop("invalid", msg, f": {invalid}")
            link.transport.send(msg.sender, p.Failed(link.address, msg.transfer_id, invalid, "invalid"))
        elif refused:  # draining: the decode side tells its router, which retries at no cost
            why = "draining" if self.refusing else ""
            link.transport.send(msg.sender, p.Failed(link.address, msg.transfer_id, refused, why))
        else:
            link.actions.put(prefill)

    def _invalid(self, msg: p.Reserve) -> str:
        """Why this Reserve can never be served here ("": it may be). Called with the lock held; what
        needs the engine (sampling parameters, the context length) is checked when it is added."""
        tid, vocab = msg.transfer_id, self.link.vocab_size
        if tid in self.outgoing or tid in self.sent or tid in self.link.leases:
            return f"transfer id {tid} is in use"
        if vocab and msg.prompt_token_ids and max(msg.prompt_token_ids) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if len(set(msg.block_ids)) != len(msg.block_ids):
            return "the destination block ids repeat"
        return self._unfit_blocks(msg)

    def _unfit_blocks(self, msg: p.Reserve) -> str:
        """Why the destination blocks do not cover the prompt after the decode's cached prefix ("": they
        do). The prefix is whole blocks and leaves at least one token to send (KV goes with the first
        token); a peer that reserved fewer blocks without saying so is refused here."""
        block_size = self.link.layout.get("block_size")
        n, cached = len(msg.prompt_token_ids), msg.cached_blocks
        if not block_size:
            return ""
        if cached * block_size >= n:
            return f"{cached} cached blocks of {block_size} leave nothing of a {n}-token prompt to send"
        if len(msg.block_ids) != -(-n // block_size) - cached:
            return (
                f"{len(msg.block_ids)} destination blocks for {n} tokens in blocks of {block_size}"
                f" after {cached} cached blocks"
            )
        return ""

    def on_abort(self, msg: p.Abort) -> None:
        with self.lock:
            out = self.outgoing.get(msg.transfer_id)
            if out is not None and out.peer != msg.sender:
                self.link.drop("wrong_sender", msg, f": transfer {msg.transfer_id} is {out.peer}'s")
                return
            self.outgoing.pop(msg.transfer_id, None)
            reading = msg.transfer_id in self.link.leases
        if out is not None:
            self.link.actions.put(Cancel(out.request_id))
        if not reading:  # a fence: nothing of this transfer will be written (one in flight fences itself)
            self.link.transport.send(msg.sender, p.Failed(self.link.address, msg.transfer_id, "aborted"))

    def on_heartbeat(self, msg: p.Heartbeat) -> None:
        with self.lock:
            unknown = [t for t in msg.transfer_ids if t not in self.outgoing and t not in self.sent]
        self.link.transport.send(msg.sender, p.Pong(self.link.address, unknown))

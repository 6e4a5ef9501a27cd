"""The KV connector: the one interface the engine and scheduler see for disaggregation.

The scheduler asks two questions of a request's hand-off (handoff.py): does its KV come from elsewhere
(`gets_kv_remotely`: reserve its prompt's blocks; the engine then calls `start_receive`), and does its
KV go elsewhere once its prefill is done (`sends_kv`: the engine calls `send_kv` instead of decoding).
Everything else (handshake, reserve, KV bytes, first token, aborts, heartbeats, timeouts) happens in
the two parts a KVConnector is made of: a Receiver (decode side, receiving.py) and a Sender (prefill
side, sending.py), each with its own transfers and lock, sharing only a Link (link.py: transport,
leases, peers, action queue). This module builds them, routes each message to its side, and runs the
engine thread's `poll` (timeouts, heartbeats, forgetting ended peers), which returns typed actions
(actions.py) for the engine to apply: the connector never touches a request.

    decode: FromPrefill -> WAITING -> blocks reserved -> WAITING_FOR_KV -> KV + Done -> Activate -> RUNNING
    prefill: Reserve -> StartPrefill (a local request, ToDecode) -> prompt computed -> KVData + Done -> freed

Threads: transport callbacks (`_on_message`) write KV bytes into reserved blocks and queue actions;
the engine thread drains them in `poll`.

Leases (leases.py) keep blocks from reuse while someone other than the engine may touch them: a request
that ends while its transfer holds one keeps its blocks (`request_finished` returns True) until the
lease ends (a Release action). Which leases each side takes, and when they end, is in its module.
Handshake and liveness bookkeeping per peer is peers.py.

Lock order: a side's lock, then the lease registry's or the peer table's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from pdserve.disagg import protocol as p
from pdserve.disagg import schemas
from pdserve.disagg.actions import Action, ActionQueue, Release
from pdserve.disagg.handoff import FirstToken, FromPrefill, HandOff, PromptKV, ToDecode
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.link import Link
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.receiving import Receiver
from pdserve.disagg.sending import Sender
from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.blocks import pool_block_bytes
from pdserve.disagg.transport.shards import ShardedPool

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0


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
        vocab_size: int = 0,  # token ids from peers must be below it (0: not checked)
    ) -> None:
        self.transport = transport
        self.kv_cache = kv_cache
        self.actions = ActionQueue()
        self.leases = LeaseRegistry(lambda request_id: self.actions.put(Release(request_id)))
        self.peers = PeerTable(peer_timeout)
        link = Link(
            transport,
            self.leases,
            self.peers,
            self.actions,
            model_name,
            layout,
            transfer_timeout,
            peer_timeout,
            vocab_size,
        )
        self.link = link
        self.block_bytes = pool_block_bytes(kv_cache, shards)
        self.receiver = Receiver(link, kv_cache, shards, self.block_bytes)
        self.sender = Sender(link, kv_cache, shards)
        self.next_heartbeat = 0.0
        self._handlers: dict[type[p.Message], Callable[[Any, Any], None]] = {
            p.Handshake: lambda m, _: self.sender.on_handshake(m),
            p.Reserve: lambda m, _: self.sender.on_reserve(m),
            p.Abort: lambda m, _: self.sender.on_abort(m),
            p.Heartbeat: lambda m, _: self.sender.on_heartbeat(m),
            p.HandshakeAck: lambda m, _: self.receiver.on_handshake_ack(m),
            p.KVData: self.receiver.on_kv_data,
            p.Done: lambda m, _: self.receiver.on_done(m),
            p.Failed: lambda m, _: self.receiver.on_failed(m),
            p.Pong: lambda m, _: self.receiver.on_pong(m),
        }
        try:
            transport.attach_pool(kv_cache, shards)
        except BaseException:
            transport.close()  # its sockets are bound: a transport never closed blocks at exit
            raise
        transport.start(self._on_message, self.receiver.payload_target, self.receiver.payload_done)

    @property
    def address(self) -> str:
        return self.transport.address

    @property
    def wake(self) -> Callable[[], None]:
        return self.actions.wake

    @wake.setter
    def wake(self, wake: Callable[[], None]) -> None:
        """How a transport thread wakes the engine thread when it queues an action."""
        self.actions.wake = wake

    def close(self) -> None:
        self.transport.close()

    def shut(self, reason: str) -> None:
        """The engine is gone: fail every transfer in progress, both ways, and every Reserve from now on,
        so peers hear it at once (the I/O threads live on: silence would take the transfer timeout)."""
        self.sender.shut(reason)
        self.receiver.shut()

    # ---- the scheduler's two questions -------------------------------------------------------------
    @staticmethod
    def gets_kv_remotely(handoff: HandOff | None) -> bool:
        return isinstance(handoff, FromPrefill)

    @staticmethod
    def sends_kv(handoff: HandOff | None) -> bool:
        return isinstance(handoff, ToDecode)

    # ---- what the engine tells it -------------------------------------------------------------------
    def start_receive(
        self,
        request_id: str,
        source: FromPrefill,
        prompt_token_ids: list[int],
        params: dict[str, Any],
        block_ids: list[int],
        cached_blocks: int = 0,
        num_output_tokens: int = 0,
    ) -> None:
        """Blocks for the request's prompt after its first `cached_blocks` (cached here) are reserved:
        ask its prefill instance to fill them. A resumed request's `num_output_tokens` outputs end
        `prompt_token_ids`."""
        self.receiver.start(
            request_id, source, prompt_token_ids, params, block_ids, cached_blocks, num_output_tokens
        )

    def layer_hook(self, prompts: list[PromptKV]) -> Callable[[int], None] | None:
        return self.sender.layer_hook(prompts)

    def send_kv(self, kv: PromptKV, first: FirstToken, num_cached_tokens: int) -> None:
        self.sender.send_kv(kv, first, num_cached_tokens)

    def failed_to_start(self, target: ToDecode, reason: str, refused: str = "") -> None:
        """The engine could not take a StartPrefill: tell the decode instance why."""
        self.sender.failed_to_start(target, reason, refused)

    def request_finished(self, request_id: str, handoff: HandOff | None) -> bool:
        """Called before the request's blocks are freed, on either side. True: keep them until a
        Release action, because a transfer may still touch them (a lease)."""
        if isinstance(handoff, ToDecode):
            return self.sender.finished(handoff.transfer_id)
        if isinstance(handoff, FromPrefill):
            return self.receiver.finished(request_id)
        return False

    # ---- the engine thread's poll -------------------------------------------------------------------
    def poll(self) -> list[Action]:
        self._tick()
        return self.actions.drain()

    def has_pending(self) -> bool:
        return bool(self.receiver.incoming or self.sender.outgoing or self.leases)

    @property
    def bytes_sent(self) -> int:
        return self.sender.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.receiver.bytes_received

    @property
    def transfers_streamed(self) -> int:
        return self.sender.transfers_streamed

    @property
    def messages_dropped(self) -> dict[str, int]:
        """Peer messages dropped since start, by reason: "malformed" (no transport of this process could
        decode them), "invalid" (a Reserve refused as such), "unknown_transfer", "wrong_sender", "unasked" (a
        handshake answer nobody asked for), "error" (handling it raised)."""
        return {**schemas.MALFORMED.snapshot(), **self.link.dropped.snapshot()}

    def take_transfer_seconds(self) -> list[float]:
        """How long each transfer received since the last call took (for metrics)."""
        seconds, self.receiver.transfer_seconds = self.receiver.transfer_seconds, []
        return seconds

    def _tick(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_INTERVAL
        busy = self.receiver.busy_peers() | self.sender.busy_peers()
        self.receiver.check(now)
        self.sender.check(now)
        self.leases.expire(now, self.transport.peer_gone)  # direct writers gone, or long past deadline
        self._forget_ended_peers(busy | self.leases.peers())

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
        """One peer message, on whichever thread the transport delivers it (the sending engine's own,
        in process): whatever it holds, it must not raise into that thread."""
        self.peers.heard_from(msg.sender, time.monotonic())
        handler = self._handlers.get(type(msg))
        if handler is None:
            return
        try:
            handler(msg, payload)
        except Exception:  # noqa: BLE001 - a bug handling one message must not stop the I/O or engine
            logger.exception("handling %s from %s failed", type(msg).__name__, msg.sender)
            self.link.dropped.add("error")

"""The KV connector: the one interface the engine and scheduler see for disaggregation.

The scheduler asks two questions: does this request get its KV from elsewhere (`gets_kv_remotely`:
reserve its prompt's blocks, then `start_receive`), and does this request's KV go elsewhere once its
prefill is done (`sends_kv`: then `send_kv` instead of decoding). Everything else (handshake, reserve,
KV bytes, first token, aborts, heartbeats, timeouts) happens here and in the transport.

    decode: add(kv_transfer) -> WAITING -> blocks reserved -> WAITING_FOR_KV -> KV + Done -> RUNNING
    prefill: Reserve -> a local request -> prompt computed, first token sampled -> KVData + Done -> freed

Threads: transport callbacks (`_on_message`) write KV bytes into reserved blocks and queue events; the
engine thread drains them in `poll`. A transfer is removed under `lock` before its blocks are freed, so
late bytes can never land in blocks that belong to someone else.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pdserve.disagg import protocol as p
from pdserve.disagg.transport.base import KVTransport
from pdserve.engine.request import Logprob, Request
from pdserve.layers.sampler import SampleResult

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0


@dataclass
class NewPrefill:
    transfer_id: str
    decode_addr: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    block_ids: list[int]


@dataclass
class KVReady:
    request_id: str
    result: SampleResult
    num_cached_tokens: int


@dataclass
class TransferFailed:
    request_id: str
    reason: str


@dataclass
class AbortPrefill:
    request_id: str


@dataclass
class ReleaseBlocks:
    """A finished request's blocks were being written when it ended; now they may be freed."""

    request_id: str


Event = NewPrefill | KVReady | TransferFailed | AbortPrefill | ReleaseBlocks


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
    writing: bool = False  # the transport is writing bytes straight into our blocks right now


@dataclass
class Outgoing:
    """Prefill side: a transfer we were asked for."""

    request_id: str
    peer: str
    started: float = field(default_factory=time.monotonic)


class KVConnector:
    def __init__(
        self,
        transport: KVTransport,
        kv_cache: torch.Tensor,  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        layout: dict[str, Any],
        model_name: str,
        transfer_timeout: float = 120.0,
        peer_timeout: float = 5.0,
    ) -> None:
        self.transport = transport
        self.kv_cache = kv_cache
        self.layout = layout
        self.model_name = model_name
        self.transfer_timeout = transfer_timeout
        self.peer_timeout = peer_timeout
        self.block_bytes = kv_cache[:, :, 0].numel() * kv_cache.element_size()
        self.lock = threading.Lock()
        self.incoming: dict[str, Incoming] = {}
        self.outgoing: dict[str, Outgoing] = {}
        self.held: dict[str, Incoming] = {}  # finished while being written: blocks freed once done
        self.sent: dict[str, float] = {}  # transfers whose KV left recently: not "unknown" to a ping
        self.peer_ok: dict[str, str] = {}  # peer -> "" when the handshake passed, else the reason
        self.last_seen: dict[str, float] = {}
        self.unanswered_since: dict[str, float] = {}  # peer -> when the oldest unanswered ping went out
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None
        self.next_heartbeat = 0.0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transfer_seconds: list[float] = []  # drained by metrics
        # host pools take KV bytes straight from the socket; device pools go through a staging copy
        self.pool_bytes = kv_cache.view(torch.uint8).numpy() if kv_cache.device.type == "cpu" else None
        transport.start(self._on_message, self._payload_target, self._payload_done)

    @property
    def address(self) -> str:
        return self.transport.address

    def close(self) -> None:
        self.transport.close()

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
        with self.lock:
            self.incoming[transfer_id] = Incoming(
                request.request_id, peer, list(request.block_ids), len(request.block_ids) * self.block_bytes
            )
            needs_handshake = self.peer_ok.get(peer) != ""
            self.last_seen.setdefault(peer, time.monotonic())
        if needs_handshake:
            self.transport.send(peer, p.Handshake(self.address, self.model_name, self.layout))
        params = asdict(request.params)
        self.transport.send(
            peer,
            p.Reserve(self.address, transfer_id, request.prompt_token_ids, params, list(request.block_ids)),
        )

    def request_finished(self, request: Request) -> bool:
        """Called before the request's blocks are freed, on either side. True: keep them until a
        ReleaseBlocks event, because bytes are landing in them right now."""
        transfer_id = (request.kv_transfer or {}).get("transfer_id")
        if transfer_id is None:
            return False
        with self.lock:
            incoming = self.incoming.pop(transfer_id, None)
            self.outgoing.pop(transfer_id, None)
            hold = incoming is not None and incoming.writing
            if hold and incoming is not None:
                self.held[transfer_id] = incoming
        if incoming is not None:  # decode gave up first: tell prefill to stop
            self.transport.send(incoming.peer, p.Abort(self.address, transfer_id))
        return hold

    # ---- prefill side -------------------------------------------------------------------------------
    def send_kv(self, request: Request, result: SampleResult) -> None:
        """The prompt is computed and its first token sampled: push KV, then the token."""
        assert request.kv_transfer is not None
        transfer_id = str(request.kv_transfer["transfer_id"])
        dst = list(request.kv_transfer["block_ids"])
        peer = str(request.kv_transfer["decode_addr"])
        if transfer_id not in self.outgoing:
            return  # aborted meanwhile
        src = torch.tensor(request.block_ids[: len(dst)], device=self.kv_cache.device)
        payload = self.kv_cache[:, :, src].contiguous()  # [layers, 2, n, block_size, heads, dim]
        host = payload.cpu().view(torch.uint8).numpy()
        logprob = asdict(result.logprob) if result.logprob is not None else None
        done = p.Done(self.address, transfer_id, result.token_id, logprob, request.num_cached_tokens)
        with self.lock:  # queued before a heartbeat can call this transfer unknown
            if self.outgoing.pop(transfer_id, None) is None:
                return
            self.sent[transfer_id] = time.monotonic()
            self.transport.send(peer, p.KVData(self.address, transfer_id, dst, host.nbytes), host)
            self.transport.send(peer, done)
        self.bytes_sent += host.nbytes

    def failed_to_start(self, transfer_id: str, peer: str, reason: str) -> None:
        with self.lock:
            self.outgoing.pop(transfer_id, None)
        self.transport.send(peer, p.Failed(self.address, transfer_id, reason))

    # ---- the engine thread's poll -------------------------------------------------------------------
    def poll(self) -> list[Event]:
        self._tick()
        events: list[Event] = []
        while not self.events.empty():
            events.append(self.events.get())
        return events

    def has_pending(self) -> bool:
        return bool(self.incoming or self.outgoing)

    def _tick(self) -> None:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + HEARTBEAT_INTERVAL
        with self.lock:
            self.sent = {t: ts for t, ts in self.sent.items() if now - ts < self.transfer_timeout}
            incoming = list(self.incoming.items())
            outgoing = list(self.outgoing.items())
            seen = dict(self.last_seen)
            silent = {peer: now - t for peer, t in self.unanswered_since.items()}
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
            with self.lock:
                self.unanswered_since.setdefault(peer, now)
            self.transport.send(peer, p.Heartbeat(self.address, tids))
        # Prefill side: a decode instance that stopped pinging has gone (or aborted): drop its work. Its
        # pings come from its engine thread, so allow for a long step there before giving up.
        for tid, out in outgoing:
            quiet = now - max(seen.get(out.peer, 0.0), out.started)
            if quiet > 4 * self.peer_timeout or now - out.started > self.transfer_timeout:
                with self.lock:
                    self.outgoing.pop(tid, None)
                self.events.put(AbortPrefill(out.request_id))

    def _fail(self, transfer_id: str, reason: str) -> None:
        with self.lock:
            inc = self.incoming.pop(transfer_id, None)
        if inc is not None:
            logger.warning("transfer %s failed: %s", transfer_id, reason)
            self.transport.send(inc.peer, p.Abort(self.address, transfer_id))
            self.events.put(TransferFailed(inc.request_id, reason))
            self.wake()

    # ---- transport callbacks (I/O thread) -----------------------------------------------------------
    def _on_message(self, msg: p.Message, payload: memoryview | None) -> None:
        with self.lock:
            self.last_seen[msg.sender] = time.monotonic()
            self.unanswered_since.pop(msg.sender, None)
        handler = getattr(self, f"_on_{type(msg).__name__}", None)
        if handler is not None:
            handler(msg, payload)

    def _on_Handshake(self, msg: p.Handshake, _: memoryview | None) -> None:  # noqa: N802
        reason = ""
        if msg.model != self.model_name:
            reason = f"model mismatch: decode serves {msg.model!r}, prefill serves {self.model_name!r}"
        elif msg.layout != self.layout:
            reason = f"KV layout mismatch: decode {msg.layout}, prefill {self.layout}"
        with self.lock:
            self.peer_ok[msg.sender] = reason
        self.transport.send(msg.sender, p.HandshakeAck(self.address, not reason, reason))

    def _on_HandshakeAck(self, msg: p.HandshakeAck, _: memoryview | None) -> None:  # noqa: N802
        with self.lock:
            self.peer_ok[msg.sender] = "" if msg.ok else msg.reason
            doomed = [t for t, inc in self.incoming.items() if inc.peer == msg.sender] if not msg.ok else []
        for tid in doomed:
            self._fail(tid, f"prefill instance {msg.sender} refused the handshake: {msg.reason}")

    def _on_Reserve(self, msg: p.Reserve, _: memoryview | None) -> None:  # noqa: N802
        with self.lock:
            refused = self.peer_ok.get(msg.sender)
            if not refused:
                self.outgoing[msg.transfer_id] = Outgoing(f"kv-{msg.transfer_id}", msg.sender)
        if refused:
            self.transport.send(msg.sender, p.Failed(self.address, msg.transfer_id, refused))
            return
        self.events.put(
            NewPrefill(msg.transfer_id, msg.sender, msg.prompt_token_ids, msg.params, msg.block_ids)
        )
        self.wake()

    def _payload_target(self, msg: p.Message) -> list[memoryview] | None:
        """Writable views of the reserved blocks, in the payload's order: [layer][k|v][block runs]."""
        if not isinstance(msg, p.KVData) or self.pool_bytes is None:
            return None
        with self.lock:
            inc = self.incoming.get(msg.transfer_id)
            if inc is None or inc.writing or msg.block_ids != inc.block_ids or inc.received:
                return None
            inc.writing = True
        runs: list[tuple[int, int]] = []
        for b in msg.block_ids:
            if runs and runs[-1][1] == b:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        pool = self.pool_bytes  # [layers, 2, blocks, ...] as bytes
        layers = range(pool.shape[0])
        return [pool[layer, kv, a:b].data.cast("B") for layer in layers for kv in (0, 1) for a, b in runs]

    def _payload_done(self, msg: p.Message, ok: bool) -> None:
        assert isinstance(msg, p.KVData)
        with self.lock:
            held = self.held.pop(msg.transfer_id, None)
            inc = self.incoming.get(msg.transfer_id)
            ready = False
            if held is None and inc is not None:
                inc.writing = False
                if ok:
                    inc.received += msg.nbytes
                    self.bytes_received += msg.nbytes
                    ready = inc.done is not None and inc.received == inc.expected_bytes
                    if ready:
                        del self.incoming[msg.transfer_id]
        if held is not None:
            self.events.put(ReleaseBlocks(held.request_id))
            self.wake()
        elif inc is not None and not ok:
            self._fail(msg.transfer_id, f"KV data from {inc.peer} broke off")
        elif ready and inc is not None and inc.done is not None:
            self._ready(inc, inc.done)

    def _on_KVData(self, msg: p.KVData, payload: memoryview | None) -> None:  # noqa: N802
        with self.lock:  # held while writing: the blocks cannot be freed under us
            inc = self.incoming.get(msg.transfer_id)
            if inc is None or payload is None or msg.block_ids != inc.block_ids or len(payload) != msg.nbytes:
                return
            src = torch.frombuffer(payload, dtype=torch.uint8).view(self.kv_cache.dtype)
            src = src.view(*self.kv_cache.shape[:2], len(msg.block_ids), *self.kv_cache.shape[3:])
            dst = torch.tensor(msg.block_ids, device=self.kv_cache.device)
            self.kv_cache[:, :, dst] = src.to(self.kv_cache.device)
            inc.received += msg.nbytes
            self.bytes_received += msg.nbytes
            ready = inc.done is not None and inc.received == inc.expected_bytes
            if ready:
                del self.incoming[msg.transfer_id]
        if ready:
            assert inc.done is not None
            self._ready(inc, inc.done)

    def _on_Done(self, msg: p.Done, _: memoryview | None) -> None:  # noqa: N802
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
        self._ready(inc, msg)

    def _ready(self, inc: Incoming, msg: p.Done) -> None:
        self.transfer_seconds.append(time.monotonic() - inc.started)
        lp = Logprob(**msg.logprob) if msg.logprob else None
        if lp is not None:
            lp.top = [(int(t), float(v)) for t, v in lp.top]
        self.events.put(KVReady(inc.request_id, SampleResult(msg.token_id, lp), msg.num_cached_tokens))
        self.wake()

    def _on_Failed(self, msg: p.Failed, _: memoryview | None) -> None:  # noqa: N802
        with self.lock:
            inc = self.incoming.pop(msg.transfer_id, None)
        if inc is not None:
            self.events.put(TransferFailed(inc.request_id, msg.reason))
            self.wake()

    def _on_Abort(self, msg: p.Abort, _: memoryview | None) -> None:  # noqa: N802
        with self.lock:
            out = self.outgoing.pop(msg.transfer_id, None)
        if out is not None:
            self.events.put(AbortPrefill(out.request_id))
            self.wake()

    def _on_Heartbeat(self, msg: p.Heartbeat, _: memoryview | None) -> None:  # noqa: N802
        with self.lock:
            unknown = [t for t in msg.transfer_ids if t not in self.outgoing and t not in self.sent]
        self.transport.send(msg.sender, p.Pong(self.address, unknown))

    def _on_Pong(self, msg: p.Pong, _: memoryview | None) -> None:  # noqa: N802
        if msg.unknown_transfer_ids:
            with self.lock:
                self.peer_ok.pop(msg.sender, None)  # a restarted peer: shake hands again
        for tid in msg.unknown_transfer_ids:
            self._fail(tid, f"prefill instance {msg.sender} lost the request (restarted?)")

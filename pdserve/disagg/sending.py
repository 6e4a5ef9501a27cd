"""The connector's prefill side: a request whose KV goes to a decode instance once its prefill is done.

    Reserve -> Outgoing and a NewPrefill event (the engine runs the prompt as a local request);
               refused (shut, or a peer whose handshake failed) -> Failed to the peer
    prompt computed, first token sampled -> send_kv: KVData (the blocks, or only the fence of writes
               that went layer by layer, layer_stream.py), then Done
    Abort, a decode instance gone quiet, or past its deadline -> AbortPrefill (and Failed to the peer)
    Heartbeat -> Pong, naming the transfers we know nothing of (neither waiting nor recently sent)

Claiming a transfer (`_claim`, in send_kv or when a streaming step is launched) moves it from
`outgoing` to `sent` and takes a "reading" lease on the request's blocks, held until the transport no
longer reads them. Nothing is written into the decode instance's blocks later than Reserve.timeout
after the Reserve: it has given up on them by then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pdserve.disagg import protocol as p
from pdserve.disagg.events import AbortPrefill, NewPrefill
from pdserve.disagg.layer_stream import Streamed, make_hook
from pdserve.disagg.state import ConnectorState
from pdserve.disagg.transport.blocks import KVBlocks
from pdserve.engine.request import Request
from pdserve.engine.sampler import SampleResult


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


class SendSide(ConnectorState):
    """Prefill side of KVConnector: takes Reserves, computes their prompts, sends the KV."""

    outgoing: dict[str, Outgoing]
    sent: dict[str, float]
    streams: dict[str, Streamed]
    transfers_streamed: int
    bytes_sent: int
    refusing: str | None

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

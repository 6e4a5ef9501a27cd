"""The transport interface both roles share (the factory that picks an implementation is factory.py).

A transport delivers control messages (protocol.py) to a peer address, optionally followed by one
payload: KV blocks of the local pool (`KVBlocks`, all layers), which the transport moves its own way.
Incoming messages are handed to one callback; with a threaded transport it runs on an I/O thread, and
a received payload comes as host bytes (memoryview) or a tensor.

Kinds (factory.make_transport):
    tcp       ZeroMQ control + raw TCP bytes; CUDA pools are staged through pinned host buffers
    cuda_ipc  the prefill writes straight into the decode pool (same host, CUDA pools)
    nccl      a NCCL process group per pair (CUDA pools; on CPU pools it runs on Gloo)
    auto      per peer at handshake: cuda_ipc where possible, else nccl (both CUDA), else tcp
    inproc    peers in one process (tests, the offline API)
The last four share tcp's control plane. The decode side offers its paths in the handshake
(`offer`), the prefill side picks one (`accept`) and says which in the ack (`accepted`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from pdserve.disagg.protocol import Message
from pdserve.disagg.transport.shards import ShardedPool

MessageHandler = Callable[[Message, memoryview | torch.Tensor | None], None]
# Zero-copy receive: where a message's payload should land (writable views, filled in order), or None
# to get it in a staging buffer through the MessageHandler instead; then whether it all arrived.
PayloadTarget = Callable[[Message], list[memoryview] | None]
PayloadDone = Callable[[Message, bool], None]


class KVTransport(ABC):
    address: str  # where peers reach this instance, e.g. tcp://127.0.0.1:5601

    @abstractmethod
    def start(
        self,
        on_message: MessageHandler,
        payload_target: PayloadTarget | None = None,
        payload_done: PayloadDone | None = None,
    ) -> None: ...

    @abstractmethod
    def send(self, peer: str, msg: Message, payload: Any | None = None) -> None:
        """Queue `msg` (and a payload: `KVBlocks` or a buffer) for `peer`; never blocks long,
        thread-safe."""

    @abstractmethod
    def forget_peer(self, peer: str) -> None:
        """Drop the connection to a peer thought dead, with whatever is still queued for it."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- KV paths: transports that only send bytes after the message keep these defaults --------
    def attach_pool(self, pool: torch.Tensor, shards: ShardedPool | None = None) -> None:  # noqa: B027
        """The local KV pool, before `start`: GPU paths export or read it (most transports need none).
        `shards`: every rank's part of a tensor-parallel pool, `pool` being rank 0's."""

    def offer(self, peer: str) -> dict[str, Any]:
        """Decode side: the KV paths offered to `peer` in the handshake."""
        return {}

    def accept(self, peer: str, offer: dict[str, Any]) -> dict[str, Any]:
        """Prefill side: pick the path to `peer` from its offer (raise ValueError: none fits)."""
        return {}

    def accepted(self, peer: str, path: dict[str, Any]) -> None:  # noqa: B027 - nothing to pick
        """Decode side: the path the prefill picked."""

    def path_to(self, peer: str) -> str:
        """The kind of path in use with `peer` ("" while none is agreed)."""
        return "bytes"

    def writes_into_pool(self, peer: str) -> bool:
        """Decode side: `peer` may write into our pool by itself (until it says it has stopped)."""
        return False

    def needs_handshake(self, peer: str) -> bool:
        """Decode side: the path to `peer` broke; shake hands again before the next transfer."""
        return False

    def can_write_layers(self, peer: str) -> bool:
        """Prefill side: can KV go to `peer` layer by layer (write_layer), straight into its pool?"""
        return False

    def write_layer(self, peer: str, layer: int, runs: list[tuple[int, int, int]]) -> None:
        """Queue one layer of (src, dst, length) block runs into the peer's pool (where can_write_layers)."""
        raise NotImplementedError

    def peer_gone(self, peer: str) -> bool:
        """True only if `peer`'s process is known to have ended (so it can write nothing more)."""
        return False

"""The transport interface both roles share, and the factory.

A transport delivers control messages (protocol.py) to a peer address, optionally followed by one raw
payload (KV bytes of whole blocks, all layers). Incoming messages are handed to one callback; with a
threaded transport it runs on the transport's I/O thread. GPU transports (CUDA IPC, NCCL) implement the
same calls and move the payload themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pdserve.disagg.protocol import Message

MessageHandler = Callable[[Message, memoryview | None], None]
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
        """Queue `msg` (and a buffer-protocol payload) for `peer`; never blocks, thread-safe."""

    @abstractmethod
    def forget_peer(self, peer: str) -> None:
        """Drop the connection to a peer thought dead, with whatever is still queued for it."""

    @abstractmethod
    def close(self) -> None: ...


def make_transport(
    kind: str, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None
) -> KVTransport:
    if kind == "tcp":
        from pdserve.disagg.transport.tcp import TcpTransport

        return TcpTransport(host, port, advertise_host)
    if kind == "inproc":
        from pdserve.disagg.transport.inproc import InprocTransport

        return InprocTransport()
    raise ValueError(f"unknown KV transport {kind!r}; choose tcp or inproc")

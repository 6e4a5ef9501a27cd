"""In-process transport: peers are objects in one process; a send calls the peer's handler directly.

Used by the offline disaggregated API (`LLM(model, prefill=1, decode=1)`) and tests; KV blocks are
gathered into one tensor on the sender's device and handed over as it is, until the receiver writes
it into its KV pool.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from pdserve.disagg.protocol import Message
from pdserve.disagg.transport.base import KVTransport, MessageHandler, PayloadDone, PayloadTarget
from pdserve.disagg.transport.blocks import KVBlocks

_PEERS: dict[str, InprocTransport] = {}
_IDS = itertools.count()
_LOCK = threading.Lock()


class InprocTransport(KVTransport):
    def __init__(self) -> None:
        self.address = f"inproc://kv-{next(_IDS)}"
        self.handler: MessageHandler | None = None

    def start(
        self,
        on_message: MessageHandler,
        payload_target: PayloadTarget | None = None,
        payload_done: PayloadDone | None = None,
    ) -> None:
        self.handler = on_message  # payloads are handed over as they are: no zero-copy target needed
        with _LOCK:
            _PEERS[self.address] = self

    def send(self, peer: str, msg: Message, payload: Any | None = None) -> None:
        with _LOCK:
            target = _PEERS.get(peer)
        if isinstance(payload, KVBlocks):
            payload = payload.gather_now()
        elif payload is not None:
            payload = memoryview(payload).cast("B")
        if target is None or target.handler is None:
            return  # like a network: a message to nobody is lost
        target.handler(msg, payload)

    def forget_peer(self, peer: str) -> None:
        pass

    def close(self) -> None:
        with _LOCK:
            _PEERS.pop(self.address, None)

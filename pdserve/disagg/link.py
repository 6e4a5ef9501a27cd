"""What the connector's two sides (receiving.py, sending.py) both use and neither owns: the
transport, the block leases, the peer table, the engine's action queue, this instance's identity
(model, KV layout, vocabulary) and time limits, and the count of peer messages dropped. Each side
keeps its own transfers and lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pdserve.disagg.actions import ActionQueue
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.protocol import Message
from pdserve.disagg.schemas import DropCounts
from pdserve.disagg.transport.base import KVTransport

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Link:
    transport: KVTransport
    leases: LeaseRegistry
    peers: PeerTable
    actions: ActionQueue
    model_name: str
    layout: dict[str, Any]  # num_layers, num_kv_heads, head_dim, block_size, dtype: checked at handshake
    transfer_timeout: float
    peer_timeout: float
    vocab_size: int = 0  # token ids from peers must be below it (0: not checked)
    dropped: DropCounts = field(default_factory=DropCounts)

    @property
    def address(self) -> str:
        return self.transport.address

    def drop(self, reason: str, msg: Message, detail: str = "") -> None:
        """A peer's message is ignored: say so, and count it by `reason`."""
        transfer = getattr(msg, "transfer_id", "")
        logger.warning(
            "dropping %s %s from %s (%s)%s", type(msg).__name__, transfer, msg.sender, reason, detail
        )
        self.dropped.add(reason)

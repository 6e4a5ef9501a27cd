"""What the connector's two sides (receiving.py, sending.py) both use and neither owns: the
transport, the block leases, the peer table, the engine's action queue, and this instance's
identity (model, KV layout) and time limits. Each side keeps its own transfers and lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.disagg.actions import ActionQueue
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.transport.base import KVTransport


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

    @property
    def address(self) -> str:
        return self.transport.address

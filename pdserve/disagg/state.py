"""What both sides of the KV connector share: the state KVConnector (connector.py) sets up and the
decode side (receiving.py) and the prefill side (sending.py) both use, declared once for them.

Declarations only: KVConnector's constructor assigns every attribute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from pdserve.disagg.events import Event
from pdserve.disagg.leases import LeaseRegistry
from pdserve.disagg.peers import PeerTable
from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.shards import ShardedPool


class ConnectorState:
    transport: KVTransport
    kv_cache: torch.Tensor  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    shards: ShardedPool | None  # tensor parallel: every rank's part of the pool
    layout: dict[str, Any]
    transfer_timeout: float
    peer_timeout: float
    lock: threading.Lock
    leases: LeaseRegistry
    peers: PeerTable
    events: queue.SimpleQueue[Event]
    wake: Callable[[], None]

    @property
    def address(self) -> str:
        return self.transport.address

"""Block leases: which transfers' KV blocks someone other than the engine may still touch.

A request that ends while its transfer holds a lease keeps its blocks until the lease ends; then the
registry calls `on_released(request_id)` (the connector turns that into a ReleaseBlocks event), so
late bytes can never land in blocks that belong to someone else:

    reason    side     held from                       until
    reading   prefill  send_kv                          the transport no longer reads the blocks
    writing   decode   received bytes start landing     they all landed (or the stream broke)
    direct    decode   start_receive, while the peer    a fence from the peer: KVData(written) (the
                       may write into our pool itself   write is complete) or Failed (it will write
                       (cuda_ipc; assumed until the     nothing); or the peer's process is gone; or
                       handshake says otherwise)        the lease expires: Reserve.timeout +
                                                        DIRECT_WRITE_GRACE after the reservation

The registry knows transfer ids, request ids and peers, never blocks or messages. It has its own lock
and may be called with the connector's lock held; it calls `on_released` and `peer_gone` without
holding its lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

Reason = Literal["reading", "writing", "direct"]


@dataclass
class Lease:
    """The reasons a transfer's blocks are not the engine's alone."""

    request_id: str
    peer: str
    reasons: set[Reason] = field(default_factory=set)
    expires: float = math.inf  # when a "direct" lease ends by itself
    finished: bool = False  # the request has ended: its blocks wait for this lease to end


class LeaseRegistry:
    """Leases by transfer id. A lease ends when its last reason is released (or it is dropped)."""

    def __init__(self, on_released: Callable[[str], None]) -> None:
        self._on_released = on_released
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def hold(
        self, transfer_id: str, request_id: str, peer: str, reason: Reason, expires: float = math.inf
    ) -> None:
        """Add `reason` to the transfer's lease; `expires` bounds a "direct" one."""
        with self._lock:
            self._hold(transfer_id, request_id, peer, reason, expires)

    def try_hold(self, transfer_id: str, request_id: str, peer: str, reason: Reason) -> bool:
        """`hold`, unless the lease already has `reason` (one writer at a time): then False."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is not None and reason in lease.reasons:
                return False
            self._hold(transfer_id, request_id, peer, reason, math.inf)
            return True

    def _hold(self, transfer_id: str, request_id: str, peer: str, reason: Reason, expires: float) -> None:
        lease = self._leases.setdefault(transfer_id, Lease(request_id, peer))
        lease.reasons.add(reason)
        if reason == "direct":
            lease.expires = expires

    def release(self, transfer_id: str, reason: Reason, peer: str | None = None) -> None:
        """`reason` no longer holds; the lease's last reason gone, a finished request's blocks are freed.
        `peer`: only if the lease is that peer's (a fence counts only from the transfer's writer)."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or reason not in lease.reasons or peer not in (None, lease.peer):
                return
            lease.reasons.discard(reason)
            if lease.reasons:
                return
            del self._leases[transfer_id]
        if lease.finished:
            self._on_released(lease.request_id)

    def release_peer(self, peer: str, reason: Reason) -> None:
        with self._lock:
            transfer_ids = [t for t, lease in self._leases.items() if lease.peer == peer]
        for transfer_id in transfer_ids:
            self.release(transfer_id, reason)

    def peers(self) -> set[str]:
        """The peers some lease still waits on."""
        with self._lock:
            return {lease.peer for lease in self._leases.values()}

    def drop(self, transfer_id: str) -> None:
        """Every byte is in: nobody else touches the blocks any more. The request goes on, or, if it
        ended meanwhile (an abort racing the last byte), its blocks are released now."""
        with self._lock:
            lease = self._leases.pop(transfer_id, None)
        if lease is not None and lease.finished:
            self._on_released(lease.request_id)

    def finish(self, transfer_id: str) -> bool:
        """The request has ended. True: a lease holds its blocks, `on_released` says when they are free."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is not None:
                lease.finished = True
            return lease is not None

    def expire(self, now: float, peer_gone: Callable[[str], bool]) -> None:
        """End the "direct" leases whose writer's process has gone or whose deadline has long passed."""
        with self._lock:
            direct = [(t, lease) for t, lease in self._leases.items() if "direct" in lease.reasons]
        for transfer_id, lease in direct:
            if now > lease.expires:
                logger.warning(
                    "transfer %s: no word from %s, its blocks are freed anyway", transfer_id, lease.peer
                )
                self.release(transfer_id, "direct")
            elif peer_gone(lease.peer):
                self.release(transfer_id, "direct")

"""What one connector knows of its peers: did the handshake pass, and does the peer still answer.

    verdict       peer -> "" when the handshake passed, else why it was refused (absent: not yet)
    asked         peer -> when we last sent it a handshake (one at a time, per peer_timeout)
    last_seen     peer -> when any message from it last arrived
    unanswered    peer -> when the oldest ping it has not answered yet went out

Bookkeeping only: the connector decides what to send and whom to fail. Has its own lock; may be called
with the connector's lock held.
"""

from __future__ import annotations

import math
import threading


class PeerTable:
    def __init__(self, peer_timeout: float) -> None:
        self.peer_timeout = peer_timeout
        self._lock = threading.Lock()
        self._verdict: dict[str, str] = {}
        self._asked: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self._unanswered: dict[str, float] = {}

    def should_handshake(self, peer: str, now: float) -> bool:
        """We are about to ask `peer` for a transfer: True if a handshake should go first (and is
        counted as sent)."""
        with self._lock:
            asked = now - self._asked.get(peer, -math.inf) < self.peer_timeout
            needed = self._verdict.get(peer) != "" and not asked
            if needed:
                self._asked[peer] = now
            self._last_seen.setdefault(peer, now)
            return needed

    def judge(self, peer: str, refusal: str) -> None:
        """The handshake with `peer` passed ("") or was refused (the reason)."""
        with self._lock:
            self._verdict[peer] = refusal

    def refusal(self, peer: str) -> str | None:
        """Empty if the handshake passed, the reason if it was refused, None if there was none yet."""
        with self._lock:
            return self._verdict.get(peer)

    def forget(self, peer: str) -> None:
        """A restarted peer: shake hands again."""
        with self._lock:
            self._verdict.pop(peer, None)
            self._asked.pop(peer, None)

    def known(self) -> list[str]:
        """Every peer we have heard from (or asked for a transfer) and not dropped."""
        with self._lock:
            return list(self._last_seen)

    def drop(self, peer: str) -> None:
        """A peer whose process has ended: nothing of it is kept."""
        with self._lock:
            for table in (self._verdict, self._asked, self._last_seen, self._unanswered):
                table.pop(peer, None)

    def heard_from(self, peer: str, now: float) -> None:
        with self._lock:
            self._last_seen[peer] = now
            self._unanswered.pop(peer, None)

    def pinged(self, peer: str, now: float) -> None:
        with self._lock:
            self._unanswered.setdefault(peer, now)

    def last_seen(self) -> dict[str, float]:
        with self._lock:
            return dict(self._last_seen)

    def silences(self, now: float) -> dict[str, float]:
        """peer -> seconds since the oldest ping it has not answered."""
        with self._lock:
            return {peer: now - t for peer, t in self._unanswered.items()}

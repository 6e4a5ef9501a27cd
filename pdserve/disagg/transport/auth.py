"""Who may talk KV with this instance: CURVE on the ZeroMQ control channel, a challenge on data links.

Both prove knowledge of the cluster secret (pdserve/cluster_secret.py); without one (secret None: the
offline API, library use) the channels stay plain and these functions do nothing.

    control (ZeroMQ):  ROUTER = CURVE server, key pair curve_keypair("server")
                       DEALER = CURVE client, key pair curve_keypair("client"), server key = the above
                       ZAP handler (ZapGate, on the transport's own thread): only that client key passes
    data (plain TCP), before any byte of KV, each step within CHALLENGE_TIMEOUT_S:

        listener                                       connector
          ── nl (16 random bytes) ─────────────────────▶
          ◀── nc (16 random bytes) + mac("data-client", nl, nc)
          checks it, else closes
          ── mac("data-server", nc, nl) ───────────────▶ checks it, else closes: sends nothing

A peer without the secret cannot finish the ZMTP handshake (none of its messages reaches the
connector, nothing is sent to it) nor pass the challenge (it never writes or reads a byte of KV).
The two MACs have their own labels and nonce orders, so neither can be replayed as the other.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import time

import zmq
from zmq.utils import z85

from pdserve.cluster_secret import ClusterSecret

logger = logging.getLogger(__name__)

CHALLENGE_TIMEOUT_S = 5.0
NONCE_BYTES = 16
MAC_BYTES = 32
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP protocol (RFC 27), one per context
ZAP_DOMAIN = b"pdserve-kv"
_LOG_EVERY_S = 10.0  # refused peers are logged at most this often (a flood must not flood the log)
# a plain peer or wrong keys; a right server key with a foreign client key is the ZAP handler's to log
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class ChallengeFailed(ConnectionError):
    """The peer of a KV data connection did not prove the cluster secret."""


# ---- control channel: CURVE + ZAP -----------------------------------------------------------------------


def make_server(sock: zmq.Socket, secret: ClusterSecret | None) -> None:
    """Make the (not yet bound) ROUTER a CURVE server of this cluster."""
    if secret is None:
        return
    public, secret_key = secret.curve_keypair("server")
    sock.curve_secretkey = secret_key
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


def make_client(sock: zmq.Socket, secret: ClusterSecret | None) -> None:
    """Make the (not yet connected) DEALER a CURVE client of this cluster's servers."""
    if secret is None:
        return
    public, secret_key = secret.curve_keypair("client")
    sock.curve_secretkey = secret_key
    sock.curve_publickey = public
    sock.curve_serverkey = secret.curve_keypair("server")[0]


class RateLimitedLog:
    """A warning at most every _LOG_EVERY_S, saying how many were held back meanwhile."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = -float("inf")
        self.held = 0

    def __call__(self, detail: str) -> None:
        now = time.monotonic()
        if now - self.last < _LOG_EVERY_S:
            self.held += 1
            return
        more = f" (and {self.held} more since the last report)" if self.held else ""
        logger.warning("%s: %s%s", self.what, detail, more)
        self.last, self.held = now, 0


class ZapGate:
    """The ZAP handler of one ZeroMQ context and a monitor of its ROUTER's failed handshakes.

    Its sockets belong to the thread that polls them (`sockets`, then `handle` with what was ready):
    the transport's control thread, so no thread of its own is needed."""

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, secret: ClusterSecret) -> None:
        self.client_key = z85.decode(secret.curve_keypair("client")[0])
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.monitor = router.get_monitor_socket(_HANDSHAKE_FAILED)
        self.refused = RateLimitedLog("KV control: refused a peer without the cluster secret")

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [self.zap, self.monitor]

    def handle(self, ready: set[zmq.Socket]) -> None:
        if self.zap in ready:
            while self.zap.poll(0):
                self._answer(self.zap.recv_multipart())
        if self.monitor in ready:
            while self.monitor.poll(0):
                self._failed_handshake(self.monitor.recv_multipart())

    def _answer(self, frames: list[bytes]) -> None:
        """One ZAP request: [version, id, domain, address, identity, mechanism, credentials...]."""
        version, request_id = (frames + [b"", b""])[:2]
        ok = (
            len(frames) == 7
            and frames[0] == b"1.0"
            and frames[5] == b"CURVE"
            and hmac.compare_digest(frames[6], self.client_key)
        )
        if not ok:
            address = frames[3].decode(errors="replace") if len(frames) > 3 else "?"
            self.refused(f"a client key that is not this cluster's, from {address}")
        status = (b"200", b"OK") if ok else (b"400", b"not a member of this cluster")
        self.zap.send_multipart([version, request_id, *status, b"", b""])

    def _failed_handshake(self, frames: list[bytes]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        try:
            event = parse_monitor_message(frames)
        except (ValueError, IndexError):
            return
        endpoint = event.get("endpoint", b"")
        where = endpoint.decode(errors="replace") if isinstance(endpoint, bytes) else str(endpoint)
        self.refused(f"a ZMTP handshake failed on {where} (no CURVE, or not this cluster's keys)")

    def close(self) -> None:
        self.zap.close(0)
        self.monitor.close(0)


# ---- data connections: the mutual HMAC challenge ---------------------------------------------------------


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ChallengeFailed("the peer closed the connection during the challenge")
        data += chunk
    return bytes(data)


def challenge_connector(conn: socket.socket, secret: ClusterSecret | None) -> None:
    """Listener side, on an accepted connection. Raises ChallengeFailed (or OSError, a timeout)."""
    if secret is None:
        return
    conn.settimeout(CHALLENGE_TIMEOUT_S)
    ours = secrets.token_bytes(NONCE_BYTES)
    conn.sendall(ours)
    answer = _recv_exact(conn, NONCE_BYTES + MAC_BYTES)
    theirs, tag = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not secret.verify("data-client", tag, ours, theirs):
        raise ChallengeFailed("the peer does not know the cluster secret")
    conn.sendall(secret.mac("data-server", theirs, ours))


def answer_listener(conn: socket.socket, secret: ClusterSecret | None) -> None:
    """Connector side, right after connecting; nothing is sent unless the listener proved the secret
    too. Raises ChallengeFailed (or OSError, a timeout); the caller closes the connection."""
    if secret is None:
        return
    previous = conn.gettimeout()
    conn.settimeout(CHALLENGE_TIMEOUT_S)
    theirs = _recv_exact(conn, NONCE_BYTES)
    ours = secrets.token_bytes(NONCE_BYTES)
    conn.sendall(ours + secret.mac("data-client", theirs, ours))
    if not secret.verify("data-server", _recv_exact(conn, MAC_BYTES), ours, theirs):
        raise ChallengeFailed("the listener does not know the cluster secret")
    conn.settimeout(previous)

"""The cluster secret: what the router and every instance of one cluster share, and what it proves.

    --cluster-secret-file FILE   the operator's secret (at least 16 bytes of text; `pdserve up` makes
                                 one per cluster, mode 0600)
    $PDSERVE_CLUSTER_SECRET      the same, given as a key in the environment (never on a command line)

Every use derives its own key from it (HMAC-SHA256 with a label), so no two channels share a key:

    handoff      the entry signs a request's kv_transfer_params; a decode instance refuses unsigned,
                 forged or expired ones (sign_handoff / check_handoff)
    curve-*      the ZeroMQ CURVE key pairs of the KV control channel: a peer without the secret cannot
                 complete the handshake, and the control messages are encrypted
    data         the challenge both ends of a KV data connection answer before any byte of KV moves

The secret authenticates peers; it does not encrypt KV bytes on the data connections: those, and the
NCCL links, still belong on a private network (docs/architecture.md, "What is authenticated").
This module never prints or logs the secret: `repr` hides it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
MIN_SECRET_BYTES = 16
HANDOFF_TTL_S = 300.0  # a signed hand-off is good this long: generous for clocks a little apart
_ROOT_LABEL = b"pdserve cluster secret v1"


class SecretError(ValueError):
    """A secret that cannot be used (too short, unreadable)."""


class HandoffRefused(ValueError):
    """Hand-off fields that this cluster did not sign, or signed too long ago."""


@dataclass(frozen=True)
class ClusterSecret:
    key: bytes = field(repr=False)  # 32 bytes: HMAC-SHA256 of the operator's text

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    @classmethod
    def from_text(cls, text: str | bytes) -> ClusterSecret:
        material = (text.encode() if isinstance(text, str) else text).strip()
        if len(material) < MIN_SECRET_BYTES:
            raise SecretError(f"a cluster secret needs at least {MIN_SECRET_BYTES} bytes")
        return cls(hmac.new(_ROOT_LABEL, material, hashlib.sha256).digest())

    @classmethod
    def from_file(cls, path: str | Path) -> ClusterSecret:
        try:
            return cls.from_text(Path(path).read_bytes())
        except OSError as e:
            raise SecretError(f"cannot read the cluster secret file {path}: {e.strerror}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClusterSecret | None:
        text = env.get(SECRET_ENV)
        return cls.from_text(text) if text else None

    @classmethod
    def create_file(cls, path: str | Path) -> ClusterSecret:
        """A new random secret, written to `path` readable by its owner only."""
        text = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        return cls.from_text(text)

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one use."""
        return hmac.new(self.key, label.encode(), hashlib.sha256).digest()

    def mac(self, label: str, *parts: bytes) -> bytes:
        """HMAC-SHA256 of `parts` (length-prefixed, so no two splits collide) under `label`'s key."""
        h = hmac.new(self.derive(label), digestmod=hashlib.sha256)
        for part in parts:
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    def verify(self, label: str, tag: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(self.mac(label, *parts), tag)

    def curve_keypair(self, side: Literal["server", "client"]) -> tuple[bytes, bytes]:
        """(public, secret) Z85 CURVE keys of the KV control channel's listening or connecting side."""
        import zmq
        from zmq.utils import z85

        secret_key = z85.encode(self.derive(f"curve-{side}"))
        return zmq.curve_public(secret_key), secret_key


def _handoff_bytes(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()


def sign_handoff(
    secret: ClusterSecret, fields: Mapping[str, Any], ttl: float = HANDOFF_TTL_S, now: float | None = None
) -> dict[str, Any]:
    """`fields` plus `expires` (unix time) and `signature`: what the entry puts in kv_transfer_params."""
    signed = {**fields, "expires": round((time.time() if now is None else now) + ttl, 3)}
    signed.pop("signature", None)
    return {**signed, "signature": secret.mac("handoff", _handoff_bytes(signed)).hex()}


def check_handoff(secret: ClusterSecret, params: Mapping[str, Any], now: float | None = None) -> None:
    """Raise HandoffRefused unless `params` were signed by this cluster and have not expired."""
    fields = dict(params)
    signature = fields.pop("signature", None)
    expires = fields.get("expires")
    if not isinstance(signature, str) or not isinstance(expires, int | float):
        raise HandoffRefused("kv_transfer_params must be signed by the cluster's entry (router)")
    try:
        tag = bytes.fromhex(signature)
    except ValueError:
        raise HandoffRefused("kv_transfer_params carry a malformed signature") from None
    if not secret.verify("handoff", tag, _handoff_bytes(fields)):
        raise HandoffRefused("kv_transfer_params were not signed with this cluster's secret")
    if (time.time() if now is None else now) > expires:
        raise HandoffRefused("kv_transfer_params have expired")

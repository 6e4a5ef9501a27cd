"""Picks a KV transport by name (the kinds are described in base.py).

The one module that imports the implementations; none of them imports it back, so the interface
(base.py) stays below them all.
"""

from __future__ import annotations

from pdserve.cluster_secret import ClusterSecret
from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.inproc import InprocTransport
from pdserve.disagg.transport.multipath import MultiPathTransport
from pdserve.disagg.transport.tcp import TcpTransport

KINDS = ("auto", "tcp", "cuda_ipc", "nccl", "inproc")
_PATHS = {"auto": ("cuda_ipc", "nccl", "tcp"), "cuda_ipc": ("cuda_ipc",), "nccl": ("nccl",)}


def make_transport(
    kind: str,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_host: str | None = None,
    secret: ClusterSecret | None = None,
) -> KVTransport:
    """`secret`: who may talk KV with this instance (transport/auth.py); None leaves the network
    transports' channels plain (the serve command never runs one that way), inproc needs none."""
    if kind == "tcp":
        return TcpTransport(host, port, advertise_host, secret)
    if kind == "inproc":
        return InprocTransport()
    if kind in _PATHS:
        return MultiPathTransport(_PATHS[kind], host, port, advertise_host, secret)
    raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(KINDS)}")

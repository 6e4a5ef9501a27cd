"""One transport, several KV paths chosen per peer at handshake: cuda_ipc, nccl and tcp.

The control plane (and the tcp byte path) is a `TcpTransport`; the GPU paths sit beside it. The
decode side offers every path its pool allows, in the handshake; the prefill side takes the first of
its own kinds that the offer holds and that works from here, and names it in the ack:

    kind      decode offers when                 prefill takes it when
    cuda_ipc  the pool is on a GPU (IPC handle;  same host (boot id) and it can open the handle(s)
              every rank's, tensor parallel)
    nccl      GPU pool (Gloo: CPU, kind nccl)    the same backend, and not one GPU for both
    tcp       always (kinds auto and tcp)        always

A path that breaks falls back to tcp for the rest of that pair's life (the decode side shakes hands
again and gets a new one). With kind `auto` a CPU pool uses tcp alone; kind `nccl` uses Gloo there.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import replace
from typing import Any

import torch

from pdserve.cluster_secret import ClusterSecret
from pdserve.disagg import protocol as p
from pdserve.disagg.transport import cuda_ipc
from pdserve.disagg.transport.base import KVTransport, MessageHandler, PayloadDone, PayloadTarget
from pdserve.disagg.transport.blocks import KVBlocks, copy_stream
from pdserve.disagg.transport.identity import gpu_uuid, local_identity, process_gone, same_host
from pdserve.disagg.transport.nccl import NcclPath
from pdserve.disagg.transport.shards import ShardedPool
from pdserve.disagg.transport.tcp import TcpTransport

logger = logging.getLogger(__name__)


class MultiPathTransport(KVTransport):
    def __init__(
        self,
        kinds: tuple[str, ...],
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        secret: ClusterSecret | None = None,
    ) -> None:
        self.kinds = kinds  # ours, in order of preference
        self.secret = secret
        self.tcp = TcpTransport(host, port, advertise_host, secret)
        self.address = self.tcp.address
        self.me = local_identity()
        self.pool: torch.Tensor | None = None
        self.shards: ShardedPool | None = None  # tensor parallel: every rank's part (pool is rank 0's)
        self.gpu = ""
        self.exported: dict[str, Any] | None = None  # decode: our pool's IPC offer (every rank's), made once
        self.nccl: NcclPath | None = None
        self.remote_pools: dict[str, ShardedPool] = {}  # prefill: peer -> its pool, opened by IPC
        self.completions: cuda_ipc.Completions | None = None
        self.copy_seconds: deque[float] = deque(maxlen=256)  # GPU time of recent direct writes
        self.offered: dict[str, list[str]] = {}  # decode: peer -> kinds offered, until its ack
        self.chosen: dict[str, str] = {}  # peer -> the kind in use
        self.peer_ids: dict[str, dict[str, Any]] = {}  # peer -> its identity
        self.handler: MessageHandler | None = None
        self.payload_done: PayloadDone | None = None
        self.lock = threading.Lock()

    # ---- setup --------------------------------------------------------------------------------------
    def attach_pool(self, pool: torch.Tensor, shards: ShardedPool | None = None) -> None:
        self.pool, self.shards = pool, shards
        if pool.is_cuda:
            self.gpu = gpu_uuid(pool.device)
            if "cuda_ipc" in self.kinds:
                self.completions = cuda_ipc.Completions()
        if "nccl" in self.kinds and (pool.is_cuda or self.kinds == ("nccl",)):
            host = self.tcp.address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
            self.nccl = NcclPath(pool, host, self.secret)

    def start(
        self,
        on_message: MessageHandler,
        payload_target: PayloadTarget | None = None,
        payload_done: PayloadDone | None = None,
    ) -> None:
        self.handler = on_message
        self.payload_done = payload_done
        self.tcp.start(self._on_message, payload_target, payload_done)

    def close(self) -> None:
        self.tcp.close()
        if self.nccl is not None:
            self.nccl.close()
        if self.completions is not None:
            self.completions.close()
        if self.exported is not None:
            cuda_ipc.forget_exported(self.exported)
        self.remote_pools.clear()

    # ---- handshake ----------------------------------------------------------------------------------
    def offer(self, peer: str) -> dict[str, Any]:
        kinds: dict[str, Any] = {}
        if "cuda_ipc" in self.kinds and self.pool is not None and self.pool.is_cuda:
            try:
                if self.exported is None and self.shards is not None:
                    self.exported = cuda_ipc.export_shards(self.shards)
                self.exported = self.exported or cuda_ipc.export_pool(self.pool)
                kinds["cuda_ipc"] = self.exported
            except RuntimeError as e:
                logger.warning("cuda_ipc: cannot export the KV pool (%s); not offered", e)
        if self.nccl is not None:
            kinds["nccl"] = self.nccl.offer(peer, self.gpu)
        if "tcp" in self.kinds:
            kinds["tcp"] = {}
        with self.lock:
            self.offered[peer] = list(kinds)
        return {"id": self.me, "kinds": kinds}

    def accept(self, peer: str, offer: dict[str, Any]) -> dict[str, Any]:
        theirs: dict[str, Any] = offer.get("kinds", {"tcp": {}}) if offer else {"tcp": {}}
        peer_id = dict(offer.get("id", {})) if offer else {}
        reasons = []
        for kind in self.kinds:
            if kind not in theirs:
                continue
            try:
                extra = self._take(kind, peer, theirs[kind], peer_id)
            except (RuntimeError, ValueError) as e:
                reasons.append(f"{kind}: {e}")
                continue
            with self.lock:
                self.chosen[peer], self.peer_ids[peer] = kind, peer_id
            logger.info("KV path to %s: %s", peer, kind)
            return {"kind": kind, "id": self.me, **extra}
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        ours = list(self.kinds)
        raise ValueError(f"no KV path in common: decode offers {sorted(theirs)}, prefill {ours}{detail}")

    def _take(self, kind: str, peer: str, offer: dict[str, Any], peer_id: dict[str, Any]) -> dict[str, Any]:
        if kind == "cuda_ipc":
            if self.pool is None or not self.pool.is_cuda:
                raise ValueError("this prefill's KV pool is not on a GPU")
            remote = cuda_ipc.open_peer_pool(offer, self.me, peer_id, self.pool.device)
            with self.lock:
                self.remote_pools[peer] = remote
            return {}
        if kind == "nccl":
            if self.nccl is None:
                raise ValueError("not available for this pool")
            return self.nccl.accept(peer, offer, self.gpu, same_host(self.me, peer_id))
        return {}

    def accepted(self, peer: str, path: dict[str, Any]) -> None:
        kind = str(path.get("kind", "tcp"))
        with self.lock:
            self.offered.pop(peer, None)
            self.chosen[peer] = kind
            self.peer_ids[peer] = dict(path.get("id", {}))
        if kind == "nccl" and self.nccl is not None:
            self.nccl.accepted(peer, path)
        logger.info("KV path from %s: %s", peer, kind)

    def path_to(self, peer: str) -> str:
        with self.lock:
            return self.chosen.get(peer, "")

    def writes_into_pool(self, peer: str) -> bool:
        with self.lock:
            kind = self.chosen.get(peer)
            return kind == "cuda_ipc" or (kind is None and "cuda_ipc" in self.offered.get(peer, []))

    def needs_handshake(self, peer: str) -> bool:
        """No path agreed (never, or forgotten) and none asked for; or the NCCL link broke."""
        with self.lock:
            kind = self.chosen.get(peer)
            if kind is None:
                return peer not in self.offered
        return kind == "nccl" and self.nccl is not None and self.nccl.needs_handshake(peer)

    def peer_gone(self, peer: str) -> bool:
        with self.lock:
            ident = self.peer_ids.get(peer)
        return ident is not None and process_gone(ident)

    def forget_peer(self, peer: str) -> None:
        self.tcp.forget_peer(peer)
        if self.nccl is not None:
            self.nccl.forget(peer)
        with self.lock:
            self.chosen.pop(peer, None)
            self.offered.pop(peer, None)
            self.remote_pools.pop(peer, None)

    # ---- data ---------------------------------------------------------------------------------------
    def send(self, peer: str, msg: p.Message, payload: Any | None = None) -> None:
        if not isinstance(payload, KVBlocks) or not isinstance(msg, p.KVData):
            self.tcp.send(peer, msg, payload)
            return
        kind = self.path_to(peer)
        if kind == "cuda_ipc" and self._send_direct(peer, msg, payload):
            return
        if kind == "nccl" and self.nccl is not None:
            announced = self.nccl.send(peer, msg, payload, lambda why: self._failed(peer, msg, why))
            if announced is not None:
                self.tcp.send(peer, announced)
                return
        self.tcp.send(peer, msg, payload)  # tcp, or a GPU path that is not (or no longer) there

    def can_write_layers(self, peer: str) -> bool:
        with self.lock:
            remote = self.remote_pools.get(peer)
            one_pool = remote is not None and len(remote.tensors) == 1 and self.shards is None
            return self.chosen.get(peer) == "cuda_ipc" and one_pool  # layer streaming: unsplit pools

    def write_layer(self, peer: str, layer: int, runs: list[tuple[int, int, int]]) -> None:
        with self.lock:
            remote = self.remote_pools.get(peer)
        if remote is not None and self.pool is not None:  # else the fence finds the path gone
            cuda_ipc.write_layer_direct(remote.tensors[0], self.pool, layer, runs)

    def _send_direct(self, peer: str, msg: p.KVData, blocks: KVBlocks) -> bool:
        with self.lock:
            remote = self.remote_pools.get(peer)
        if remote is None or self.completions is None:
            return False
        try:
            began, done = cuda_ipc.write_blocks_direct(remote, blocks, msg.block_ids)
        except RuntimeError as e:  # wait for whatever copies did start, then say it failed
            copy_stream(blocks.pool.device).synchronize()
            blocks.done()
            self._failed(peer, msg, f"direct KV write failed: {e}")
            return True

        def finish(ok: bool) -> None:
            blocks.done()
            if ok:
                if not blocks.streamed:
                    self.copy_seconds.append(began.elapsed_time(done) / 1e3)
                self.tcp.send(peer, replace(msg, written=True))
            else:
                self._failed(peer, msg, "direct KV write failed on the GPU")

        self.completions.after(done, finish)
        return True

    def _failed(self, peer: str, msg: p.KVData, why: str) -> None:
        self.tcp.send(peer, p.Failed(self.address, msg.transfer_id, why))

    def _on_message(self, msg: p.Message, payload: memoryview | torch.Tensor | None) -> None:
        assert self.handler is not None
        if isinstance(msg, p.KVData) and msg.link and self.nccl is not None:
            self.nccl.receive(msg, self._deliver)
            return
        self.handler(msg, payload)

    def _deliver(self, msg: p.KVData, data: torch.Tensor | None) -> None:
        """A chunk received over a NCCL link (None: the link broke, the transfer is lost)."""
        assert self.handler is not None
        if data is not None:
            self.handler(msg, data)
        elif self.payload_done is not None:
            self.payload_done(msg, False)

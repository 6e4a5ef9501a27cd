"""The nccl KV path: a two-rank process group per prefill/decode pair, point-to-point sends of KV.

    decode: a TCPStore (the rendezvous), its address and a fresh pair id ──Handshake.kv_offer──▶ prefill
    prefill: rank 0 of ProcessGroupNCCL(PrefixStore(pair, store), 0, 2) ◀──▶ decode: rank 1
    per transfer: KVData(link=pair) on the control plane announces it, then in that order on the link:
      prefill: gather CHUNK_BYTES of blocks on the link's stream -> send, chunk after chunk
      decode:  recv each chunk into a staging buffer -> hand it to the connector, which scatters it

One thread per link owns its process group and runs the link's jobs one at a time, in the order they
were queued; jobs are queued in control-plane order (the prefill queues a send as it announces it, the
decode a receive as the announcement arrives), so sends and receives always pair up. CUDA pools use
NCCL; CPU pools use Gloo (the same code, so this path is testable without a GPU). NCCL cannot put
both ranks on one GPU, so such a pair is refused. The NCCL watchdog is told to abort a hung
communicator rather than the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=2 unless set): a broken link
fails its transfers, and the decode side shakes hands again for a new one.

What is authenticated: the offer (store address, pair id) travels on the control channel, which is
CURVE-encrypted between holders of the cluster secret (auth.py). The rendezvous itself cannot be: a
TCPStore takes no credentials and anyone who reaches its port may connect. So its keys are made
unguessable instead: their prefix is a MAC of the pair id under the cluster secret (`store_prefix`),
and the pair id itself is random and sent only encrypted. The NCCL (or Gloo) link that follows is
neither authenticated nor encrypted: like the store's port, it belongs on a private network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdserve.cluster_secret import ClusterSecret
from pdserve.disagg.protocol import KVData
from pdserve.disagg.transport.blocks import KVBlocks

logger = logging.getLogger(__name__)

CHUNK_BYTES = 128 << 20  # the most a link sends at once: bounds both sides' staging memory
LINK_TIMEOUT = timedelta(seconds=120)  # rendezvous, and any one send or receive
Deliver = Callable[[KVData, torch.Tensor | None], None]  # a received chunk, or None: the rest is lost


def store_prefix(pair: str, secret: ClusterSecret | None) -> str:
    """The rendezvous keys' prefix: without the secret, nobody on the network can name them."""
    tag = "" if secret is None else secret.mac("nccl-store", pair.encode()).hex()
    return f"pdserve-kv/{pair}/{tag}/"


def chunks(msg: KVData) -> list[tuple[int, int]]:
    """The [start, end) block ranges a transfer is cut into; both ends compute the same."""
    n = len(msg.block_ids)
    per = max(1, CHUNK_BYTES // max(1, msg.nbytes // max(1, n)))
    return [(i, min(i + per, n)) for i in range(0, n, per)]


@dataclass
class _Send:
    blocks: KVBlocks
    failed: Callable[[str], None]


@dataclass
class _Recv:
    msg: KVData
    deliver: Deliver


class Link:
    """One pair's process group and the thread that runs its sends or receives in order."""

    def __init__(
        self,
        pair: str,
        rank: int,
        store: Callable[[], dist.Store],
        device: torch.device,
        host: str,
        prefix: str | None = None,
    ) -> None:
        self.pair, self.rank, self.device, self.host = pair, rank, device, host
        self.prefix = prefix or store_prefix(pair, None)  # of the rendezvous keys
        self.make_store = store  # called on the link's thread: joining a rendezvous may take a while
        self.jobs: queue.SimpleQueue[_Send | _Recv | None] = queue.SimpleQueue()
        self.broken = ""  # why the link failed, once it has
        self.closed = False  # no job is queued after the end-of-jobs sentinel: it would never run
        self.lock = threading.Lock()
        self.pg: Any = None
        self.thread = threading.Thread(target=self._run, name=f"kv-nccl-{pair[:8]}", daemon=True)
        self.thread.start()

    def put(self, job: _Send | _Recv) -> None:
        """Queue a job; on a closed link it fails at once (its blocks come back, its peer is told)."""
        with self.lock:
            if not self.closed:
                self.jobs.put(job)
                return
        self._fail(job)

    def close(self, wait: float = 0.0) -> None:
        with self.lock:
            self.broken = self.broken or "closed"
            self.closed = True
            self.jobs.put(None)
        pg = self.pg
        if pg is not None and self.device.type == "cuda":
            with contextlib.suppress(Exception):
                pg.abort()  # unblocks a send or receive whose peer has gone
        if wait:
            self.thread.join(wait)

    def _run(self) -> None:
        stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                self.pg = self._connect()
            except Exception as e:  # noqa: BLE001 - any failure to connect breaks just this link
                self._break(f"NCCL link {self.pair[:8]} did not connect: {e}")
            while (job := self.jobs.get()) is not None:
                if self.broken:
                    self._fail(job)
                    continue
                try:
                    self._send(job) if isinstance(job, _Send) else self._recv(job)
                except Exception as e:  # noqa: BLE001 - the link is unusable from here on
                    self._break(f"NCCL link {self.pair[:8]} broke: {e}")
                    self._fail(job)
        self.pg = None  # the process group ends on the thread that used it

    def _break(self, reason: str) -> None:
        logger.warning("%s", reason)
        self.broken = reason

    def _fail(self, job: _Send | _Recv) -> None:
        if isinstance(job, _Send):
            job.blocks.done()
            job.failed(self.broken)
        else:
            job.deliver(job.msg, None)

    def _connect(self) -> Any:
        store = dist.PrefixStore(self.prefix, self.make_store())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            opts: Any = dist.ProcessGroupNCCL.Options()
            opts._timeout = LINK_TIMEOUT
            pg: Any = dist.ProcessGroupNCCL(store, self.rank, 2, opts)
        else:
            gloo = dist.ProcessGroupGloo
            opts = gloo._Options()  # type: ignore[attr-defined]
            opts._devices = [gloo.create_device(hostname=self.host)]
            opts._timeout = LINK_TIMEOUT
            pg = gloo(store, self.rank, 2, opts)
        probe = torch.zeros(1, device=self.device)  # connect now, not on the first transfer
        (pg.send([probe], 1, 0) if self.rank == 0 else pg.recv([probe], 0, 0)).wait()
        self._synchronize()
        return pg

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _send(self, job: _Send) -> None:
        try:
            for start, end in chunks_of(job.blocks):
                buf = job.blocks.gather(start, end).view(torch.uint8).reshape(-1)
                self.pg.send([buf], 1, 0).wait()  # on CUDA: the link's stream waits for the send
            self._synchronize()
        finally:
            job.blocks.done()

    def _recv(self, job: _Recv) -> None:
        msg = job.msg
        block_bytes = msg.nbytes // len(msg.block_ids)
        for start, end in chunks(msg):
            buf = torch.empty((end - start) * block_bytes, dtype=torch.uint8, device=self.device)
            self.pg.recv([buf], 0, 0).wait()
            self._synchronize()
            part = replace(msg, block_ids=msg.block_ids[start:end], nbytes=buf.numel(), link="")
            job.deliver(part, buf)


def chunks_of(blocks: KVBlocks) -> list[tuple[int, int]]:
    return chunks(KVData("", "", blocks.block_ids, blocks.nbytes))


class NcclPath:
    """The links of one instance, by peer, and (decode side) the rendezvous store peers join."""

    def __init__(self, pool: torch.Tensor, host: str, secret: ClusterSecret | None = None) -> None:
        self.device = pool.device
        self.secret = secret
        self.backend = "nccl" if pool.is_cuda else "gloo"
        self.host = host  # this instance's advertised host: where peers reach its store and link
        self.server: dist.TCPStore | None = None
        self.pending: dict[str, str] = {}  # decode: peer -> pair id offered, not yet accepted
        self.links: dict[str, Link] = {}  # peer -> its current link
        self.lock = threading.Lock()

    def offer(self, peer: str, gpu: str) -> dict[str, Any]:
        """Decode side: a rendezvous for `peer` (the same one until it is accepted)."""
        with self.lock:
            if self.server is None:
                self.server = dist.TCPStore(
                    self.host, 0, is_master=True, wait_for_workers=False, timeout=LINK_TIMEOUT
                )
            pair = self.pending.setdefault(peer, uuid.uuid4().hex)
            port = self.server.port
        return {"store": f"{self.host}:{port}", "pair": pair, "backend": self.backend, "gpu": gpu}

    def accept(self, peer: str, offer: dict[str, Any], gpu: str, same_host: bool) -> dict[str, Any]:
        """Prefill side: join the decode side's rendezvous as rank 0. Raises ValueError if we can't."""
        if offer.get("backend") != self.backend:
            raise ValueError(f"nccl: decode pool uses {offer.get('backend')}, prefill pool {self.backend}")
        if self.backend == "nccl" and same_host and offer.get("gpu") == gpu:
            raise ValueError("nccl: prefill and decode share one GPU, and NCCL needs two")
        pair = str(offer["pair"])
        with self.lock:
            old = self.links.get(peer)
            if old is not None and old.pair == pair and not old.broken:
                return {"pair": pair}  # the same handshake again
        host, port = str(offer["store"]).rsplit(":", 1)

        def store() -> dist.Store:
            return dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=LINK_TIMEOUT)

        prefix = store_prefix(pair, self.secret)
        self._replace(peer, Link(pair, 0, store, self.device, self.host, prefix))
        return {"pair": pair}

    def accepted(self, peer: str, path: dict[str, Any]) -> None:
        """Decode side: the prefill joined the pair we offered; join it as rank 1."""
        with self.lock:
            pair = self.pending.pop(peer, None)
        server = self.server
        with self.lock:
            link = self.links.get(peer)
        if link is not None and link.pair == path.get("pair"):
            return  # the ack of a handshake sent twice
        if pair is None or pair != path.get("pair") or server is None:
            logger.warning("nccl: %s accepted an unknown pair; shaking hands again", peer)
            return
        prefix = store_prefix(pair, self.secret)
        self._replace(peer, Link(pair, 1, lambda: server, self.device, self.host, prefix))

    def needs_handshake(self, peer: str) -> bool:
        with self.lock:
            link = self.links.get(peer)
            return peer not in self.pending and (link is None or bool(link.broken))

    def send(self, peer: str, msg: KVData, blocks: KVBlocks, failed: Callable[[str], None]) -> KVData | None:
        """Prefill side: queue the send; returns the announcement to put on the control plane, or
        None when there is no working link (the caller sends the bytes another way)."""
        with self.lock:
            link = self.links.get(peer)
        if link is None or link.broken:
            return None
        link.put(_Send(blocks, failed))
        return replace(msg, link=link.pair)

    def receive(self, msg: KVData, deliver: Deliver) -> None:
        """Decode side: an announced transfer; receive it on its link, in announcement order."""
        with self.lock:
            link = next((lk for lk in self.links.values() if lk.pair == msg.link), None)
        if link is None:
            deliver(msg, None)
        else:
            link.put(_Recv(msg, deliver))

    def forget(self, peer: str) -> None:
        with self.lock:
            link = self.links.pop(peer, None)
            self.pending.pop(peer, None)
        if link is not None:
            link.close()

    def _replace(self, peer: str, link: Link) -> None:
        with self.lock:
            old, self.links[peer] = self.links.get(peer), link
        if old is not None:
            old.close()

    def close(self) -> None:
        with self.lock:
            links, self.links = list(self.links.values()), {}
        for link in links:
            link.close(wait=5.0)
        self.server = None

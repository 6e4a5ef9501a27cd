"""The cuda_ipc KV path: on one host, the prefill instance copies its blocks straight into the decode
instance's KV pool, GPU to GPU over the copy engine (NVLink/PCIe peer copies), with no host staging.

    decode: export the pool once (a CUDA IPC handle, JSON-safe)  ──Handshake.kv_offer──▶ prefill
    prefill: open it once per peer (mapped into its own GPU's address space, peer access enabled)
    per transfer, on a side stream:  remote_blocks[d:d+n].copy_(local_blocks[s:s+n])
             for each run of blocks contiguous on both sides: pools are block-major in memory
             (pdserve/kv_layout.py), so each run, all layers, K and V, is one contiguous memcpy
    then an event: once it completes, KVData(written=True) tells the decode side the write is done.

Tensor-parallel pools on either side (shards.py): the decode offers every rank's handle, the prefill
copies each run shard to shard, the heads they share (a strided copy where the splits differ). Rank 0
issues every copy from its own GPU, so a run between two other GPUs' shards crosses the links twice.

An IPC handle cannot be opened by the process that exported it, so peers in one process (the offline
`LLM(prefill=..., decode=...)`) use the pool tensor itself, found in `_EXPORTED` (module state, one
entry per exported pool). Which writes may still land is the connector's business (leases): this
module only promises that `KVData(written=True)` or `Failed` is sent after the last byte landed.

Authentication: the IPC handle (the right to write into the decode pool) and every KVData travel on
the control channel, which admits only holders of the cluster secret and is encrypted (auth.py); a
handle opens only on the same host, by a process allowed to use that GPU.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch

from pdserve.disagg.transport.blocks import KVBlocks, copy_stream, paired_runs
from pdserve.disagg.transport.identity import gpu_uuid, local_gpu, same_host, same_process
from pdserve.disagg.transport.shards import ShardedPool, copy_run, head_copies

logger = logging.getLogger(__name__)

_EXPORTED: dict[str, torch.Tensor] = {}  # token -> a pool this process exported (in-process peers)
_DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def export_pool(pool: torch.Tensor) -> dict[str, Any]:
    """The handle peers open to write into `pool` (a CUDA tensor) from another process."""
    (_, handle, size, offset, ref, ref_offset, event, event_sync) = pool.untyped_storage()._share_cuda_()
    token = uuid.uuid4().hex
    _EXPORTED[token] = pool
    return {
        "token": token,
        "gpu": gpu_uuid(pool.device),
        "handle": _b64(handle),
        "storage_bytes": size,
        "storage_offset": offset,
        "ref": _b64(ref),
        "ref_offset": ref_offset,
        "event": _b64(event) if event else "",
        "event_sync": bool(event_sync),
        "shape": list(pool.shape),
        "stride": list(pool.stride()),
        "offset": pool.storage_offset(),
        "dtype": str(pool.dtype),
    }


def export_shards(shards: ShardedPool) -> dict[str, Any]:
    """The offer of a tensor-parallel pool: every rank's handle and first KV head. Rank 0 exports its
    own tensor; a worker's is the export it was opened from (an opened mapping cannot be exported
    again), registered here too so that in-process peers use rank 0's mapping."""
    if shards.ipc is None:
        raise RuntimeError("the ranks' pools were not opened from CUDA IPC handles")
    infos = []
    for tensor, info in zip(shards.tensors, shards.ipc, strict=True):
        if info is None:
            info = export_pool(tensor)
        else:
            _EXPORTED[str(info["token"])] = tensor
        infos.append(info)
    return {"shards": infos, "starts": list(shards.starts), "num_heads": shards.num_heads}


def forget_exported(offer: dict[str, Any]) -> None:
    for info in offer.get("shards", [offer]):
        _EXPORTED.pop(str(info.get("token")), None)


def open_pool(info: dict[str, Any], local: torch.device, in_process: bool) -> torch.Tensor:
    """The peer's pool as a tensor this process can copy into. Raises RuntimeError where it cannot.

    The mapping is opened on our own GPU (`local`), with peer access, so that each copy is one
    same-device memcpy to torch (the copy engine moves it over the GPUs' link)."""
    if in_process:
        pool = _EXPORTED.get(str(info["token"]))
        if pool is None:
            raise RuntimeError("the in-process peer's pool is gone")
        return pool
    owner = local_gpu(str(info["gpu"]))
    if owner is None:
        raise RuntimeError("the decode instance's GPU is not visible to this process")
    if owner != local.index and not torch.cuda.can_device_access_peer(local.index or 0, owner):
        raise RuntimeError(f"no peer access from cuda:{local.index} to cuda:{owner}")
    storage = torch.UntypedStorage._new_shared_cuda(
        local.index,
        base64.b64decode(info["handle"]),
        int(info["storage_bytes"]),
        int(info["storage_offset"]),
        base64.b64decode(info["ref"]),
        int(info["ref_offset"]),
        base64.b64decode(info["event"]) if info["event"] else b"",
        bool(info["event_sync"]),
    )
    pool = torch.empty(0, dtype=_DTYPES[str(info["dtype"])], device=local)
    return pool.set_(storage, int(info["offset"]), list(info["shape"]), list(info["stride"]))


def open_peer_pool(
    offer: dict[str, Any], me: dict[str, Any], peer: dict[str, Any], local: torch.device
) -> ShardedPool:
    """The decode instance's pool (every rank's part if it is tensor parallel), opened on `local`."""
    if not same_host(me, peer):
        raise RuntimeError("the decode instance is on another host")
    in_process = same_process(me, peer)
    if "shards" not in offer:
        return ShardedPool.whole(open_pool(offer, local, in_process))
    tensors = [open_pool(info, local, in_process) for info in offer["shards"]]
    return ShardedPool(tensors, [int(x) for x in offer["starts"]], int(offer["num_heads"]))


def write_layer_direct(
    remote: torch.Tensor, local: torch.Tensor, layer: int, runs: list[tuple[int, int, int]]
) -> None:
    """Enqueue the copy of one layer's K and V of (src, dst, length) block runs (paired_runs) into
    `remote` on the side stream, after what the current stream has queued so far (that layer's KV)."""
    stream = copy_stream(local.device)
    stream.wait_stream(torch.cuda.current_stream(local.device))
    with torch.cuda.stream(stream):
        theirs, ours = remote[layer], local[layer]  # [2, blocks, ...]: strided over blocks
        for s, d, n in runs:
            theirs[:, d : d + n].copy_(ours[:, s : s + n], non_blocking=True)


def write_blocks_direct(
    remote: ShardedPool, blocks: KVBlocks, dst: list[int]
) -> tuple[torch.cuda.Event, torch.cuda.Event]:
    """Enqueue the copies of `blocks` into `remote`'s blocks `dst` on the side stream; return the
    timing events recorded before the first and after the last of them (`done`: the write landed).
    Blocks already streamed layer by layer (`blocks.streamed`) get only the events: a fence."""
    local = blocks.pool
    copies = head_copies(remote, blocks.shards or ShardedPool.whole(local))
    stream = copy_stream(local.device)
    if blocks.ready is not None:
        stream.wait_event(blocks.ready)
    with torch.cuda.stream(stream):
        began = torch.cuda.Event(enable_timing=True)
        began.record(stream)
        for s, d, n in [] if blocks.streamed else paired_runs(blocks.block_ids, dst):
            # one copy per run of blocks (and pair of shards), every layer and K/V at once: a copy per
            # layer and K/V would be 128 launches for a 64-layer model, the link idle between them; one
            # memcpy when both pools are block-major in memory and hold the same heads
            copy_run(copies, s, d, n)
        done = torch.cuda.Event(enable_timing=True)
        done.record(stream)
    return began, done


class Completions:
    """One thread that waits for CUDA events in order and runs what follows each one."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[torch.cuda.Event, Callable[[bool], None]] | None] = (
            queue.SimpleQueue()
        )
        self.thread = threading.Thread(target=self._run, name="kv-ipc-done", daemon=True)
        self.thread.start()

    def after(self, event: torch.cuda.Event, then: Callable[[bool], None]) -> None:
        self.queue.put((event, then))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(5)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            event, then = item
            try:
                event.synchronize()
                ok = True
            except RuntimeError:
                logger.exception("a direct KV write failed on the GPU")
                ok = False
            try:
                then(ok)
            except Exception:
                logger.exception("after a direct KV write")

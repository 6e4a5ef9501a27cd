"""Rank 0's side of tensor parallelism: start the workers, send them each step, notice when one dies.

Steps go over one pipe per worker (pickled once, written to each): a pipe write and read cost tens of
microseconds, need no extra thread or socket, and its end-of-file tells a worker that rank 0 is gone.
A monitor thread waits on the workers' process sentinels; when one exits unasked it records why and
stops the other workers. A collective waiting for a dead rank fails at once on Gloo but never returns
on NCCL, so on CUDA rank 0 waits for each step by polling an event while watching that record, never
in a blocking synchronize. The step, and every later one, raises WorkerDiedError, which the engine
turns into an error for each request in flight. A step that fails on rank 0 part-way leaves the workers
in the middle of it, so it too ends the group: later steps raise WorkerDiedError saying so.

NCCL teardown (abort) waits until every CUDA graph that captured one of its collectives is destroyed,
and may wait on a dead peer: rank 0 aborts its group only in `close()` after a healthy run, once the
runner has dropped its graphs; otherwise (a failure, or no close before exit) the group is left to
the process's exit.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pdserve.config import CacheConfig, ModelConfig, SchedulerConfig
from pdserve.distributed.group import COLLECTIVE_TIMEOUT, TPGroup, keep_forever, rank_device
from pdserve.distributed.messages import WorkerSpec
from pdserve.distributed.sharding import check_heads
from pdserve.distributed.worker import run_worker
from pdserve.errors import EngineDeadError
from pdserve.kernels.config import KernelConfig

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # workers importing torch and reaching the rendezvous
STOP_TIMEOUT_S = 10.0
DEATH_GRACE_S = 1.0  # after a failed collective, how long to wait for the dead worker's exit to show

T = TypeVar("T")


class WorkerDiedError(EngineDeadError):
    """A tensor-parallel worker died (or the ranks fell out of step): this engine can run no more steps."""


class _Health:
    """Shared between the driver and its monitor thread (the thread must not hold the driver)."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.closing = False
        self.keep: list[object] = []  # never destroyed once the group has failed

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            for obj in self.keep:
                keep_forever(obj)


class TPDriver:
    """Rank 0's handle on the workers: launch them, run steps on all ranks, stop them."""

    def __init__(
        self, group: TPGroup, procs: list[BaseProcess], conns: list[Connection], backs: list[Connection]
    ) -> None:
        self.group = group
        self.procs = procs
        self.conns = conns
        self.backs = backs  # worker -> rank 0: what a worker hands over after building (its KV pool)
        self.health = _Health()
        threading.Thread(
            target=_monitor, args=(procs, self.health), name="pdserve-tp-monitor", daemon=True
        ).start()
        self._finalizer = weakref.finalize(self, _stop, procs, conns, self.health, group, False)

    @property
    def healthy(self) -> bool:
        return self.health.failure is None

    def keep_if_failed(self, obj: object) -> None:
        """Never destroy `obj` if the group fails: a CUDA graph whose replay may hang in a collective."""
        self.health.keep.append(obj)

    @property
    def worker_pids(self) -> list[int]:
        return [int(p.pid or 0) for p in self.procs]

    @classmethod
    def launch(
        cls,
        model: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        hf_config: Any,
        kernels: KernelConfig,
    ) -> TPDriver:
        """Spawn ranks 1..N-1 and join the group as rank 0 (blocks until every worker has joined)."""
        size = model.tensor_parallel_size
        check_heads(hf_config.num_attention_heads, hf_config.num_key_value_heads, size)
        device = rank_device(model.device, 0, size)
        _check_devices(device, size)
        store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // size)
        parent = os.getpid()
        log_level = logging.getLogger("pdserve").getEffectiveLevel()
        procs: list[BaseProcess] = []
        conns: list[Connection] = []
        backs: list[Connection] = []
        for rank in range(1, size):
            spec = WorkerSpec(
                rank,
                size,
                store.port,
                parent,
                threads,
                log_level,
                model,
                cache,
                scheduler,
                hf_config,
                kernels,
            )
            reader, writer = ctx.Pipe(duplex=False)
            back_reader, back_writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=run_worker, args=(spec, reader, back_writer), name=f"pdserve-tp{rank}", daemon=True
            )
            proc.start()
            reader.close()
            back_writer.close()
            procs.append(proc)
            conns.append(writer)
            backs.append(back_reader)
        try:
            _wait_joining(store, procs)
            group = TPGroup.connect(store, 0, size, device)
        except BaseException:
            _stop(procs, conns, _Health(), None, False)
            raise
        logger.info("tensor parallel: %d ranks, workers %s", size, [p.pid for p in procs])
        return cls(group, procs, conns, backs)

    def worker_pools(self, timeout: float = STARTUP_TIMEOUT_S) -> list[Any]:
        """The pool handle each worker sends once it is built (CacheConfig.share_pool), rank order."""
        handles = []
        for rank, conn in enumerate(self.backs, start=1):
            try:
                if not conn.poll(timeout):
                    raise WorkerDiedError(f"tensor-parallel rank {rank} sent no KV pool in {timeout:.0f}s")
                handles.append(conn.recv())
            except (EOFError, OSError) as e:
                raise WorkerDiedError(f"tensor-parallel rank {rank} exited before sending its KV pool") from e
        return handles

    def check(self) -> None:
        if self.health.failure is not None:
            raise WorkerDiedError(self.health.failure)

    def send(self, step: object) -> None:
        """Send one step to every worker (before rank 0 runs it)."""
        self.check()
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:
            self.health.fail(self._wait_failure() or f"a tensor-parallel worker is gone: {e}")
            raise WorkerDiedError(self.health.failure) from e

    def run(self, step: Any, forward: Callable[[Any], T]) -> T:
        """Send `step` to the workers, run `forward(step)` here and wait until its GPU work is done."""
        self.send(step)
        try:
            out = forward(step)
            self._wait_device()
        except WorkerDiedError:
            raise
        except Exception as e:
            failure = self._wait_failure()
            if failure is not None:
                raise WorkerDiedError(failure) from e
            self.health.fail(f"a step failed on rank 0 part-way ({type(e).__name__}: {e})")
            raise
        return out

    def _wait_device(self) -> None:
        """Wait for the work queued on the current stream, failing if a worker dies meanwhile."""
        if self.group.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            self.check()
            time.sleep(0)  # let other threads run

    def _wait_failure(self) -> str | None:
        """The recorded failure; a collective can fail a moment before the dead worker's exit shows."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while self.health.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.health.failure

    def close(self) -> None:
        """Stop the workers and release rank 0's group (idempotent). On CUDA, drop every CUDA graph
        that captured a collective first: NCCL's teardown waits for them."""
        if self._finalizer.detach() is not None:
            _stop(self.procs, self.conns, self.health, self.group, self.health.failure is None)


def _check_devices(device: torch.device, size: int) -> None:
    if device.type != "cuda":
        return
    needed = (device.index or 0) + size
    if torch.cuda.device_count() < needed:
        raise ValueError(
            f"tensor_parallel_size {size} from {device} needs {needed} visible CUDA devices; "
            f"{torch.cuda.device_count()} visible"
        )


def _wait_joining(store: dist.TCPStore, procs: Sequence[BaseProcess]) -> None:
    """Wait until every worker is about to join the group; fail at once if one dies before."""
    keys = [f"joining/{rank}" for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not store.check(keys):
        for rank, proc in enumerate(procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker rank {rank} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def _monitor(procs: list[BaseProcess], health: _Health) -> None:
    by_sentinel = {p.sentinel: (rank, p) for rank, p in enumerate(procs, start=1)}
    sentinel = wait(list(by_sentinel))[0]  # blocks until some worker exits
    if health.closing:
        return
    assert isinstance(sentinel, int)
    rank, proc = by_sentinel[sentinel]
    proc.join(1.0)
    health.fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
    logger.error("%s; this engine can run no more steps", health.failure)
    for other in procs:
        if other.is_alive():
            other.kill()


def _stop(
    procs: list[BaseProcess], conns: list[Connection], health: _Health, group: TPGroup | None, clean: bool
) -> None:
    """Stop the workers; release the group if `clean` (graphs dropped, no rank lost), else leave it."""
    health.closing = True
    stop = pickle.dumps(None)
    for conn in conns:
        with contextlib.suppress(OSError):  # already gone
            conn.send_bytes(stop)
        conn.close()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
    if group is not None and clean:
        group.close()
    elif group is not None:
        group.abandon()

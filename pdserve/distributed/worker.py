"""A tensor-parallel worker process (ranks 1..N-1): builds its shard, then runs the steps rank 0 sends.

It samples nothing and owns no requests; rank 0's pipe is its only input. It exits when rank 0 says
stop, when the pipe closes (rank 0 exited or died), or when its parent pid changes (a watcher thread,
in case it is stuck where the pipe is not read). Any error ends the process with a traceback on stderr,
which rank 0 sees as a dead worker.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection

from pdserve.distributed.messages import WorkerSpec

logger = logging.getLogger(__name__)

PARENT_POLL_S = 0.5


def run_worker(spec: WorkerSpec, conn: Connection, back: Connection) -> None:
    """The process entry point (multiprocessing spawn target)."""
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s tp{spec.rank} %(name)s: %(message)s"
    )
    import torch
    import torch.distributed as dist

    from pdserve.distributed.group import COLLECTIVE_TIMEOUT, TPGroup, rank_device
    from pdserve.engine.model_runner import ModelRunner

    torch.set_num_threads(spec.num_threads)
    device = rank_device(spec.model.device, spec.rank, spec.size)
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.size, False, timeout=COLLECTIVE_TIMEOUT)
    store.set(f"joining/{spec.rank}", "1")
    group = TPGroup.connect(store, spec.rank, spec.size, device)
    runner = ModelRunner(
        spec.model, spec.cache, spec.hf_config, spec.scheduler, tp=group, kernels=spec.kernels
    )
    if spec.cache.share_pool:  # a disaggregated role: rank 0's connector moves this rank's KV too
        from pdserve.distributed.shared_pool import pool_handle

        back.send(pool_handle(runner.kv_cache))
    while True:
        try:
            step = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(1)  # rank 0 is gone: nothing to clean up with
        if step is None:
            break
        runner.run_step(step)
    runner.close()  # drops the CUDA graphs, which NCCL's teardown waits for
    group.close()
    logging.shutdown()
    os._exit(0)  # no interpreter teardown: nothing left in this process needs it


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # rank 0 died: no cleanup that could wait on a collective

"""Tensor parallelism inside one host: which slice of the model each rank holds, the process group its
layers reduce over, and the worker processes that run ranks 1..N-1 beside the engine's rank 0.

    engine process (rank 0)                          worker process (rank r, spawned)
      ModelRunner.execute(chunks)                      loop:
        step inputs ──pipe (pickled, one per worker)──▶  step = recv()
        forward ◀══ all_reduce / all_gather (NCCL on CUDA, Gloo on CPU) ══▶ forward (no sampling)
        sample (rank 0 only)

Nothing here knows about requests or scheduling; at tp=1 none of it runs (no process, no collective).
"""

"""How long a KV hand-off of N bytes takes, per transport, for the profile.

    tcp        two pdserve TcpTransports in this process on loopback (benchmarks/kv_transport_throughput.py
               runs them in two processes): a KVData header and its payload, received into a buffer;
               0 bytes is one control message (a Reserve's or a Done's trip)
    cuda_ipc   a device-to-device copy of N bytes: what a cuda_ipc hand-off does on one host, its floor

Each point is the median of a few sends after a first one that opens the connection.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from pdserve.planning.profile import Curve

REPEATS = 3


def tcp_curve(sizes: Sequence[int], timeout: float = 30.0) -> Curve:
    import numpy as np

    from pdserve.disagg import protocol as p
    from pdserve.disagg.transport.tcp import TcpTransport

    largest = max(sizes)
    buffer = np.empty(max(largest, 1), dtype=np.uint8)
    landed = threading.Event()

    def target(msg: p.Message) -> list[memoryview] | None:
        assert isinstance(msg, p.KVData)
        return [buffer[: msg.nbytes].data.cast("B")]

    receiver, sender = TcpTransport(), TcpTransport()
    receiver.start(lambda msg, payload: landed.set(), target, lambda msg, ok: landed.set())
    sender.start(lambda msg, payload: None)
    try:
        data = np.frombuffer(np.random.bytes(largest), dtype=np.uint8)

        def once(n: int) -> float:
            landed.clear()
            start = time.perf_counter()
            if n == 0:
                sender.send(receiver.address, p.Heartbeat(sender.address))
            else:
                sender.send(receiver.address, p.KVData(sender.address, "probe", [0], n), data[:n])
            if not landed.wait(timeout):
                raise TimeoutError(f"a {n}-byte KV probe did not land in {timeout}s")
            return time.perf_counter() - start

        points = sorted({0, *sizes})
        once(0), once(min(s for s in points if s) if any(points) else 0)  # connect both channels
        seconds = [statistics.median(once(n) for _ in range(REPEATS)) for n in points]
    finally:
        sender.close()
        receiver.close()
    return Curve(tuple(float(n) for n in points), tuple(seconds))


def device_copy_curve(sizes: Sequence[int], device: Any) -> Curve:
    import torch

    src = torch.empty(max(sizes), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for n in sizes:
        dst[:n].copy_(src[:n])
        torch.cuda.synchronize(device)
        runs = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            dst[:n].copy_(src[:n])
            torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - start)
        seconds.append(statistics.median(runs))
    return Curve(tuple(float(n) for n in sizes), tuple(seconds))

"""Free TCP ports for the servers the tests start, safe when several pytest-xdist workers pick at once.

The kernel's `bind(port 0)` would hand every worker a random port of the whole ephemeral range, which
the port stays in until the server we start binds it: another worker, or any outgoing connection
(ephemeral ports too), could take it in between. Here each worker draws from a band of its own below
the ephemeral range (so no outgoing connection and no `--kv-port 0` bind lands there), never hands the
same port out twice, and checks that nobody listens on it now.
"""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 10_000, 32_000  # below Linux's default ephemeral range (32768-60999)
_given: set[int] = set()
_rng = random.Random()  # not the global one, which tests seed


def _band() -> range:
    """This worker's share of [LOW, HIGH): all of it outside xdist, else 1/N of it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    width = (HIGH - LOW) // max(workers, 1)
    start = LOW + (index % max(workers, 1)) * width
    return range(start, start + width)


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's band that nobody listens on now and that no caller got before."""
    band = _band()
    for _ in range(1000):
        port = _rng.choice(band)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {band} on {host}")

"""KV transport throughput on loopback: pdserve's tcp transport vs a raw TCP socket, in the same run.

Two processes each time: a sender and a receiver that writes every payload into a preallocated
buffer (the raw socket: one range; pdserve: 60 ranges, as the decode side fills 30 layers x K/V).
Reports GB/s for both and the ratio.

    .venv/bin/python benchmarks/kv_transport_throughput.py [--mib 64] [--count 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import time

import numpy as np

from pdserve.disagg import protocol as p
from pdserve.disagg.transport.tcp import TcpTransport


def raw_receiver(port_q: mp.Queue, done_q: mp.Queue, size: int, count: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(size)
    view = memoryview(buf)
    for _ in range(count):
        got = 0
        while got < size:
            got += conn.recv_into(view[got:], size - got)
    done_q.put(time.perf_counter())


def raw_sender(port: int, size: int, count: int) -> float:
    data = np.random.bytes(size)
    s = socket.create_connection(("127.0.0.1", port))
    t = time.perf_counter()
    for _ in range(count):
        s.sendall(data)
    return t


def zmq_receiver(addr_q: mp.Queue, done_q: mp.Queue, size: int, count: int) -> None:
    """Receives like a decode instance: bytes land straight in 60 separate ranges of a pool
    (30 layers x K/V of SmolLM2), through the transport's zero-copy path."""
    transport = TcpTransport()
    pool = np.empty((60, 2 * size // 60), dtype=np.uint8)  # twice the payload: ranges are not adjacent
    seen = [0]

    def target(msg: p.Message) -> list[memoryview] | None:
        n = size // 60
        return [pool[i, :n].data.cast("B") for i in range(59)] + [pool[59, : size - 59 * n].data.cast("B")]

    def done(msg: p.Message, ok: bool) -> None:
        seen[0] += 1
        if seen[0] == count:
            done_q.put(time.perf_counter())

    transport.start(lambda m, b: None, target, done)
    addr_q.put(transport.address)
    time.sleep(600)


def zmq_sender(addr: str, size: int, count: int) -> float:
    transport = TcpTransport()
    transport.start(lambda m, b: None)
    data = np.frombuffer(np.random.bytes(size), dtype=np.uint8)
    transport.send(addr, p.Heartbeat(transport.address))  # connect first
    time.sleep(0.5)
    t = time.perf_counter()
    for i in range(count):
        transport.send(addr, p.KVData(transport.address, str(i), [0], size), data)
    return t


def run(receiver, sender, size: int, count: int) -> float:
    q_addr: mp.Queue = mp.Queue()
    q_done: mp.Queue = mp.Queue()
    proc = mp.Process(target=receiver, args=(q_addr, q_done, size, count), daemon=True)
    proc.start()
    start = sender(q_addr.get(timeout=30), size, count)
    end = q_done.get(timeout=300)
    proc.terminate()
    return size * count / (end - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64, help="payload size (one request's KV, all layers)")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = args.mib << 20
    raw = [run(raw_receiver, raw_sender, size, args.count) for _ in range(args.repeats)]
    ours = [run(zmq_receiver, zmq_sender, size, args.count) for _ in range(args.repeats)]
    r, o = float(np.median(raw)), float(np.median(ours))
    print(f"payload {args.mib} MiB x {args.count}, median of {args.repeats}")
    print("| path | GB/s |\n|---|---:|")
    print(f"| raw TCP socket (sendall -> recv_into) | {r:.2f} |")
    print(f"| pdserve tcp transport (into 60 pool ranges) | {o:.2f} |")
    print(f"\npdserve tcp / raw socket: {o / r:.0%}")


if __name__ == "__main__":
    main()

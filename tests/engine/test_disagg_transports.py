"""KV transports end to end: 1P1D greedy output equals colocated whichever way the KV travels, the KV
really moved (byte counters, and a decode engine that never ran a prompt), the path picked is the one
asked for, and every pool is free afterwards.

CPU: tcp, nccl (on Gloo, with transfers cut into several chunks) and auto (which picks tcp on CPU),
through `LLM(prefill=1, decode=1)`; nccl also with the prefill engine in another process. Leases: the
decode side never frees blocks a direct writer may still write into before a fence or the lease's
end. GPU (marked `gpu`): prefill on cuda:0, decode on cuda:1 (cuda:0 with one GPU), a random-weight
float32 model, tcp / nccl / cuda_ipc / auto in one process, and cuda_ipc / nccl / auto across two
processes (an IPC handle cannot be opened in the process that made it).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from pdserve.disagg import connector as conn
from pdserve.disagg import protocol as p
from pdserve.disagg import receiving
from pdserve.disagg.actions import Activate, Fail, Release
from pdserve.disagg.handoff import FirstToken, FromPrefill, PromptKV, ToDecode
from pdserve.disagg.transport import nccl
from pdserve.disagg.transport.base import KVTransport
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(NUM_GPUS == 0, reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason="NCCL needs two GPUs (one rank each)")


def _path(engine: Engine, peer: Engine) -> str:
    assert engine.connector is not None and peer.connector is not None
    return engine.connector.transport.path_to(peer.connector.address)


def _assert_kv_moved(prefill: Engine, decode: Engine, prompts: list[list[int]]) -> None:
    assert decode.connector is not None and prefill.connector is not None
    assert decode.num_prefill_tokens == 0, "the decode engine ran a prompt"
    assert prefill.num_prefill_tokens == sum(len(x) for x in prompts)
    assert decode.connector.bytes_received == prefill.connector.bytes_sent > 0


# ---- CPU: the offline API with each transport ------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_prompts(prompt_ids) -> list[list[int]]:
    return prompt_ids[:6]


@pytest.fixture(scope="module")
def colocated(model_dir, cpu_prompts) -> list[list[int]]:
    llm = LLM(model_dir, num_blocks=256)
    try:
        return [c.token_ids for c in llm.generate_ids(cpu_prompts, GREEDY)]
    finally:
        llm.close()


@pytest.mark.parametrize(("kind", "path"), [("tcp", "bytes"), ("nccl", "nccl"), ("auto", "tcp")])
def test_cpu_transport_equals_colocated(model_dir, cpu_prompts, colocated, kind, path, monkeypatch):
    monkeypatch.setattr(nccl, "CHUNK_BYTES", 3 * 737_280)  # SmolLM2 f32 blocks: 3 to a chunk
    llm = LLM(model_dir, num_blocks=256, prefill=1, decode=1, kv_transport=kind)
    try:
        assert [c.token_ids for c in llm.generate_ids(cpu_prompts, GREEDY)] == colocated
        prefill, decode = llm.prefill_engines[0], llm.engines[0]
        _assert_kv_moved(prefill, decode, cpu_prompts)
        assert _path(decode, prefill) == path and _path(prefill, decode) == path
        assert llm.check_pool_free()
    finally:
        llm.close()


def test_explicit_kinds_without_a_common_path_are_refused(model_dir):
    prefill = _engine(model_dir, "prefill", "cpu", "cuda_ipc")  # a CPU pool offers no IPC handle
    decode = _engine(model_dir, "decode", "cpu", "cuda_ipc")
    try:
        assert prefill.connector is not None
        addr = prefill.connector.address
        decode.add_request("r", [1, 2, 3, 4, 5], GREEDY, FromPrefill(addr))
        last = _drive([decode], [prefill], ["r"])["r"]
        assert last.finish_reason == "error" and "no KV path in common" in (last.error or "")
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


def test_cpu_nccl_prefill_in_another_process(model_dir, cpu_prompts, colocated):
    with _prefill_process(model_dir, "cpu", "nccl", "float32") as addr:
        decode = _engine(model_dir, "decode", "cpu", "nccl")
        try:
            assert _generate(decode, [], addr, cpu_prompts) == colocated
            assert decode.connector is not None and decode.connector.bytes_received > 0
            assert decode.connector.transport.path_to(addr) == "nccl"
            assert decode.num_prefill_tokens == 0 and decode.check_pool_free()
        finally:
            decode.close()


# ---- leases: no byte of a direct writer lands in blocks that someone else owns ---------------------


class _FakeDirect(KVTransport):
    """A transport whose peers write into our pool themselves (like cuda_ipc); records what we send."""

    def __init__(self, gone: bool = False) -> None:
        self.address = "fake://decode"
        self.sent: list[p.Message] = []
        self.gone = gone

    def start(self, on_message: Any, payload_target: Any = None, payload_done: Any = None) -> None:
        pass

    def send(self, peer: str, msg: p.Message, payload: Any | None = None) -> None:
        self.sent.append(msg)

    def forget_peer(self, peer: str) -> None:
        pass

    def close(self) -> None:
        pass

    def writes_into_pool(self, peer: str) -> bool:
        return True

    def peer_gone(self, peer: str) -> bool:
        return self.gone


def _decode_connector(transport: KVTransport, timeout: float = 120.0) -> conn.KVConnector:
    pool = torch.zeros(2, 2, 8, 4, 1, 2)  # [layers, 2, blocks, block_size, heads, dim]
    return conn.KVConnector(transport, pool, {}, "m", transfer_timeout=timeout, peer_timeout=60.0)


SOURCE = FromPrefill("fake://prefill")


def _reserved(c: conn.KVConnector, blocks: list[int]) -> str:
    """Start receiving request "r" into `blocks`; the transfer's id."""
    c.start_receive("r", SOURCE, [1, 2, 3], {}, blocks)
    return c.receiver.transfer_of["r"]


def _finished(c: conn.KVConnector) -> bool:
    return c.request_finished("r", SOURCE)


def _releases(c: conn.KVConnector) -> list[str]:
    c.next_heartbeat = 0.0
    return [e.request_id for e in c.poll() if isinstance(e, Release)]


@pytest.mark.parametrize("fence", ["failed", "written"])
def test_aborted_direct_transfer_holds_blocks_until_the_writer_fences(fence):
    transport = _FakeDirect()
    c = _decode_connector(transport)
    tid = _reserved(c, [2, 3])
    assert _finished(c), "blocks freed while the prefill may still write into them"
    assert any(isinstance(m, p.Abort) for m in transport.sent)
    assert _releases(c) == []
    nbytes = 2 * c.block_bytes
    msg = p.Failed("fake://prefill", tid, "aborted") if fence == "failed" else None
    msg = msg or p.KVData("fake://prefill", tid, [2, 3], nbytes, written=True)
    c._on_message(msg, None)
    assert _releases(c) == ["r"]
    assert not c.leases


def test_failed_direct_transfer_holds_blocks_until_the_lease_expires(monkeypatch):
    monkeypatch.setattr(receiving, "DIRECT_WRITE_GRACE", 0.3)
    c = _decode_connector(_FakeDirect(), timeout=0.2)
    _reserved(c, [5])
    time.sleep(0.25)
    c.next_heartbeat = 0.0
    events = c.poll()
    assert any(isinstance(e, Fail) for e in events)
    assert _finished(c), "a timed-out direct transfer freed its blocks at once"
    assert _releases(c) == []
    time.sleep(0.3)
    assert _releases(c) == ["r"]


def test_direct_writer_whose_process_is_gone_releases_at_once():
    c = _decode_connector(_FakeDirect(gone=True))
    _reserved(c, [1])
    assert _finished(c)
    assert _releases(c) == ["r"]


def test_completed_direct_transfer_is_ready_and_leaves_no_lease():
    c = _decode_connector(_FakeDirect())
    tid = _reserved(c, [4])
    c._on_message(p.Done("fake://prefill", tid, 7), None)
    assert not [e for e in c.poll() if isinstance(e, Activate)], "ready before the write finished"
    c._on_message(p.KVData("fake://prefill", tid, [4], c.block_bytes, written=True), None)
    ready = [e for e in c.poll() if isinstance(e, Activate)]
    assert ready and ready[0].first == FirstToken(7)
    assert not c.leases and not _finished(c)


def test_prefill_writes_nothing_after_the_decode_deadline():
    transport = _FakeDirect()
    c = _decode_connector(transport)
    c._on_message(p.Reserve("fake://decode2", "t1", [1, 2], {}, [0], timeout=0.05), None)
    time.sleep(0.1)
    target = ToDecode("t1", "fake://decode2", (0,))
    c.send_kv(PromptKV("kv-t1", target, (6,)), FirstToken(3), 0)
    assert not any(isinstance(m, p.KVData) for m in transport.sent)
    assert any(isinstance(m, p.Failed) and m.transfer_id == "t1" for m in transport.sent)
    assert not c.request_finished("kv-t1", target)


def test_abort_racing_the_last_byte_still_frees_the_blocks(monkeypatch):
    """The client leaves just as a direct transfer completes: the request ends between the I/O thread
    taking the transfer out of `incoming` and dropping its lease. The drop must free its blocks."""
    c = _decode_connector(_FakeDirect())
    tid = _reserved(c, [4])
    drop = c.leases.drop

    def abort_then_drop(transfer_id: str) -> None:
        assert _finished(c)  # the engine thread's abort, in between
        drop(transfer_id)

    monkeypatch.setattr(c.leases, "drop", abort_then_drop)
    c._on_message(p.Done("fake://prefill", tid, 7), None)
    c._on_message(p.KVData("fake://prefill", tid, [4], c.block_bytes, written=True), None)
    assert _releases(c) == ["r"] and not c.leases


class _FakeTcp(_FakeDirect):
    """Peers send bytes; nobody writes into our pool but us."""

    def writes_into_pool(self, peer: str) -> bool:
        return False


def _failures(c: conn.KVConnector) -> list[str]:
    return [e.reason for e in c.poll() if isinstance(e, Fail)]


def test_kv_data_of_the_wrong_size_fails_the_transfer_at_once():
    """Bytes that cannot be the reserved blocks (a prefill with another layout at the same address):
    the transfer fails now, not after the transfer timeout, whether they would land in place or be
    staged first, and nothing keeps the blocks."""
    c = _decode_connector(_FakeTcp())
    tid = _reserved(c, [2, 3])
    assert c.receiver.payload_target(p.KVData("fake://prefill", tid, [2, 3], c.block_bytes)) is None
    assert any("bytes" in reason for reason in _failures(c)) and not c.leases
    tid = _reserved(c, [5, 6])
    staged = torch.zeros(c.block_bytes, dtype=torch.uint8)
    c._on_message(p.KVData("fake://prefill", tid, [5, 6], c.block_bytes), staged)
    assert _failures(c) and not _finished(c)


def test_staging_and_writing_failures_fail_the_transfer_and_release_its_blocks(monkeypatch):
    """No pinned memory for the bytes, or the copy into the pool raising: the transfer fails, the
    "writing" lease goes, the I/O thread goes on."""
    c = _decode_connector(_FakeTcp())
    c.receiver.pool_bytes = None  # a GPU pool's path: bytes land in a staging buffer first

    def no_memory(nbytes: int) -> torch.Tensor:
        raise RuntimeError("out of pinned memory")

    msg = p.KVData("fake://prefill", _reserved(c, [1]), [1], c.block_bytes)
    with monkeypatch.context() as m:
        m.setattr(receiving, "pinned_bytes", no_memory)
        assert c.receiver.payload_target(msg) is None
    assert any("staging" in reason for reason in _failures(c)) and not c.leases

    def broken_copy(*args: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access")

    msg = p.KVData("fake://prefill", _reserved(c, [2]), [2], c.block_bytes)
    assert c.receiver.payload_target(msg) is not None and c.leases  # "writing" held while bytes land
    monkeypatch.setattr(receiving, "write_blocks", broken_copy)
    c.receiver.payload_done(msg, True)
    assert _failures(c) and not c.leases and not _finished(c)


# ---- driving engines by hand (different devices, other processes) ---------------------------------


def _engine(
    model_dir: str,
    role: str,
    device: str,
    kind: str,
    dtype: str = "float32",
    stream_layers: bool = False,
    tp: int = 1,
    num_blocks: int = 256,
) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(path=model_dir, device=device, dtype=dtype, tensor_parallel_size=tp),
            cache=CacheConfig(block_size=16, num_blocks=num_blocks),
            disagg=DisaggConfig(role=role, kv_transport=kind, stream_layers=stream_layers),
        )
    )


def _drive(decodes: list[Engine], prefills: list[Engine], ids: list[str], deadline: float = 120.0) -> dict:
    last: dict[str, Any] = {}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    end = time.monotonic() + deadline
    while len(last) < len(ids):
        assert time.monotonic() < end, "requests did not finish in time"
        for e in prefills:
            e.step()
        outs = [o for e in decodes for o in e.step()]
        for o in outs:
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                last[o.request_id] = o
        if not outs:
            time.sleep(0.002)
    for rid, o in last.items():
        o.new_token_ids = tokens[rid]
    return last


def _generate(decode: Engine, prefills: list[Engine], addr: str, prompts: list[list[int]]) -> list[list[int]]:
    ids = [f"q{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        decode.add_request(rid, prompt, GREEDY, FromPrefill(addr))
    done = _drive([decode], prefills, ids)
    assert all(done[i].error is None for i in ids), [done[i].error for i in ids]
    return [done[i].new_token_ids for i in ids]


def serve_prefill(model_dir: str, device: str, kind: str, dtype: str, tp: str = "1") -> None:
    """A prefill engine in this process (a child of a test): prints its KV address, then steps until
    its stdin closes."""
    engine = _engine(model_dir, "prefill", device, kind, dtype, tp=int(tp))
    assert engine.connector is not None
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(engine.connector.address, flush=True)
    while not stop.is_set():
        engine.step()
        if engine.idle:
            time.sleep(0.001)
    engine.close()


@contextlib.contextmanager
def _prefill_process(model_dir: str, device: str, kind: str, dtype: str, tp: int = 1) -> Iterator[str]:
    code = (
        "from tests.engine.test_disagg_transports import serve_prefill as s; s(*__import__('sys').argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, model_dir, device, kind, dtype, str(tp)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        assert proc.stdout is not None
        addr = proc.stdout.readline().strip()
        assert addr.startswith("tcp://"), f"prefill process did not start (rc={proc.poll()})"
        yield addr
    finally:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight Llama (float32 weights) and a tokenizer trained on the spot."""
    from .tiny_models import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def gpu_prompts() -> list[list[int]]:
    return [[(7 * i + 3 * j) % 500 + 2 for j in range(5 + 9 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def gpu_colocated(tiny_model, gpu_prompts) -> list[list[int]]:
    llm = LLM(tiny_model, device="cuda:0", dtype="float32", num_blocks=256)
    try:
        return [c.token_ids for c in llm.generate_ids(gpu_prompts, GREEDY)]
    finally:
        llm.close()


DECODE_GPU = "cuda:1" if NUM_GPUS >= 2 else "cuda:0"


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("tcp", "bytes"),
        pytest.param("nccl", "nccl", marks=needs_two_gpus),
        ("cuda_ipc", "cuda_ipc"),
        ("auto", "cuda_ipc"),
    ],
)
@pytest.mark.gpu
@needs_gpu
def test_gpu_one_process(tiny_model, gpu_prompts, gpu_colocated, kind, path):
    prefill = _engine(tiny_model, "prefill", "cuda:0", kind)
    decode = _engine(tiny_model, "decode", DECODE_GPU, kind)
    try:
        assert prefill.connector is not None
        got = _generate(decode, [prefill], prefill.connector.address, gpu_prompts)
        assert got == gpu_colocated
        _assert_kv_moved(prefill, decode, gpu_prompts)
        assert _path(decode, prefill) == path
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


@pytest.mark.gpu
@needs_gpu
def test_gpu_layer_streaming_equals_colocated(tiny_model, gpu_prompts, gpu_colocated):
    """--kv-stream-layers: each prompt's KV goes to the decode pool layer by layer during the prefill
    step; send_kv only fences it."""
    prefill = _engine(tiny_model, "prefill", "cuda:0", "cuda_ipc", stream_layers=True)
    decode = _engine(tiny_model, "decode", DECODE_GPU, "cuda_ipc")
    try:
        assert prefill.connector is not None
        got = _generate(decode, [prefill], prefill.connector.address, gpu_prompts)
        assert got == gpu_colocated
        _assert_kv_moved(prefill, decode, gpu_prompts)
        assert prefill.connector.transfers_streamed > 0 and not prefill.connector.sender.streams
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


def test_the_runner_calls_the_layer_hook_after_every_layer_of_an_eager_step(model_dir):
    from pdserve.engine.scheduler import ScheduledChunk

    llm = LLM(model_dir, num_blocks=64)
    runner = llm.engine.runner
    request = Request("r", list(range(5, 40)), GREEDY)
    request.block_ids = [0, 1, 2]
    layers: list[int] = []
    runner.launch([ScheduledChunk(request, 35)], after_layer=layers.append).wait()
    assert layers == list(range(llm.engine.hf_config.num_hidden_layers))


def test_no_layer_streaming_without_a_direct_path(model_dir):
    prefill = _engine(model_dir, "prefill", "cpu", "tcp", stream_layers=True)
    try:
        assert prefill.connector is not None
        prompt = PromptKV("kv-t", ToDecode("t", "tcp://x:1", (0,)), (0,))
        assert prefill.connector.layer_hook([prompt]) is None  # a CPU pool, and tcp writes no pools
    finally:
        prefill.close()


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("cuda_ipc", "cuda_ipc"),
        pytest.param("nccl", "nccl", marks=needs_two_gpus),
        ("auto", "cuda_ipc"),
    ],
)
@pytest.mark.gpu
@needs_gpu
def test_gpu_two_processes(tiny_model, gpu_prompts, gpu_colocated, kind, path):
    with _prefill_process(tiny_model, "cuda:0", kind, "float32") as addr:
        decode = _engine(tiny_model, "decode", DECODE_GPU, kind)
        try:
            assert _generate(decode, [], addr, gpu_prompts) == gpu_colocated
            assert decode.connector is not None
            assert decode.connector.bytes_received == sum(
                -(-len(x) // 16) * decode.connector.block_bytes for x in gpu_prompts
            )
            assert decode.connector.transport.path_to(addr) == path
            assert decode.num_prefill_tokens == 0 and decode.check_pool_free()
        finally:
            decode.close()


def serve_decode(model_dir: str, device: str, prefill_addr: str, num_blocks: str) -> None:
    """A decode engine in this process (a child of a test) with a pool of `num_blocks`: one request's
    KV comes from `prefill_addr`; prints "done", then idles until killed."""
    engine = _engine(model_dir, "decode", device, "cuda_ipc", num_blocks=int(num_blocks))
    engine.add_request("q", list(range(3, 40)), GREEDY, FromPrefill(prefill_addr))
    done = _drive([engine], [], ["q"])
    assert done["q"].error is None, done["q"].error
    print("done", flush=True)
    while True:
        engine.step()
        time.sleep(0.01)


@pytest.mark.gpu
@needs_gpu
def test_gpu_killed_decode_gets_its_pool_memory_back(tiny_model):
    """A decode killed after a cuda_ipc hand-off: its GPU memory comes back once the prefill, which
    mapped its pool, sees the process gone and lets go of the mapping (a restarted decode on that GPU
    would otherwise find a pool's worth of memory missing for as long as the prefill lives: on an H200,
    with forgetting turned off, the 2 GiB pool stayed taken after the kill until the mapping was
    dropped by hand)."""
    gpu = torch.device(DECODE_GPU)
    pool_bytes = 1 << 31  # the tiny model's KV: 32 KiB a block (float32)
    prefill = _engine(tiny_model, "prefill", "cuda:0", "cuda_ipc")
    assert prefill.connector is not None
    stop = threading.Event()

    def step_prefill() -> None:
        while not stop.is_set():
            if not prefill.step():
                time.sleep(0.002)

    stepper = threading.Thread(target=step_prefill)
    stepper.start()
    code = "from tests.engine.test_disagg_transports import serve_decode as s; s(*__import__('sys').argv[1:])"
    args = [tiny_model, DECODE_GPU, prefill.connector.address, str(pool_bytes // (32 << 10))]
    try:
        before = torch.cuda.mem_get_info(gpu)[0]
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
            assert torch.cuda.mem_get_info(gpu)[0] < before - pool_bytes  # the pool is there
            assert prefill.connector.peers.known()  # and mapped by the prefill
        finally:
            proc.kill()
            proc.wait(30)
        end = time.monotonic() + 30
        while prefill.connector.peers.known() and time.monotonic() < end:
            time.sleep(0.1)
        assert not prefill.connector.peers.known(), "the prefill kept the ended decode"
        while torch.cuda.mem_get_info(gpu)[0] < before - pool_bytes // 4 and time.monotonic() < end:
            time.sleep(0.1)
        assert torch.cuda.mem_get_info(gpu)[0] >= before - pool_bytes // 4, "the pool's memory stayed taken"
    finally:
        stop.set()
        stepper.join(30)
        prefill.close()


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_two_processes_tensor_parallel(tiny_model, gpu_prompts, gpu_colocated):
    """cuda_ipc between a TP 2 prefill in another process and a TP 2 decode here: the prefill opens
    every decode rank's pool by its IPC handle (the decode worker's too) and copies its own ranks'
    heads into them."""
    with _prefill_process(tiny_model, "cuda", "cuda_ipc", "float32", tp=2) as addr:
        decode = _engine(tiny_model, "decode", "cuda", "cuda_ipc", tp=2)
        try:
            assert _generate(decode, [], addr, gpu_prompts) == gpu_colocated
            assert decode.connector is not None and decode.connector.transport.path_to(addr) == "cuda_ipc"
            assert decode.num_prefill_tokens == 0 and decode.check_pool_free()
        finally:
            decode.close()


def test_tcp_binds_another_pair_when_the_data_port_is_taken(monkeypatch):
    """The control port comes free but port + 1 does not: the transport lets go of the control port
    and tries another pair (a pair collision, seen once under CI load)."""
    import socket

    from pdserve.disagg.transport.tcp import TcpTransport

    real = socket.create_server
    calls: list[int] = []

    def busy_once(address, **kwargs):
        calls.append(address[1])
        if len(calls) == 1:
            raise OSError("address in use")
        return real(address, **kwargs)

    monkeypatch.setattr(socket, "create_server", busy_once)
    transport = TcpTransport("127.0.0.1", 0)
    try:
        assert len(calls) == 2
        assert transport.address.endswith(f":{calls[1] - 1}")
    finally:
        transport.close()


def test_tcp_control_thread_survives_malformed_messages_and_bad_peers():
    """One thread owns every control socket: frames that are not messages, a sender that is not an
    address, and peers zmq cannot connect to are dropped with a warning, and it goes on serving."""
    import zmq

    from pdserve.disagg.transport.tcp import TcpTransport

    got: list[p.Message] = []
    transport = TcpTransport("127.0.0.1", 0)
    transport.start(lambda msg, payload: got.append(msg))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(transport.address)
    try:
        frames = [b"null", b"[1]", b'"x"', b"5", b'{"type": "Heartbeat", "sender": 5}', b"[" * 100_000]
        for frame in frames:
            sock.send(frame)
        transport.send("garbage", p.Heartbeat(transport.address))
        transport.send(5, p.Heartbeat(transport.address))  # type: ignore[arg-type]
        sock.send(p.encode(p.Heartbeat("tcp://127.0.0.1:1", ["t"])))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [type(m) for m in got] == [p.Heartbeat] and got[0].transfer_ids == ["t"]
        assert transport.threads[0].is_alive()
    finally:
        sock.close(0)
        ctx.term()
        transport.close()


def test_a_dead_prefill_engine_fails_its_transfers_at_once(model_dir):
    """The prefill's engine step raises while its I/O threads live on (they answer heartbeats): the
    decode hears Failed for its transfer now, not after the 120 s transfer timeout, and the reason
    says the engine stopped."""
    from pdserve.engine.async_engine import AsyncEngine

    prefill = AsyncEngine(
        EngineConfig(
            model=ModelConfig(path=model_dir),
            cache=CacheConfig(block_size=16, num_blocks=64),
            disagg=DisaggConfig(role="prefill", kv_transport="tcp"),
        )
    )
    prefill.start(timeout=120)
    decode = _engine(model_dir, "decode", "cpu", "tcp")
    try:

        def broken() -> list[Any]:
            raise RuntimeError("a CUDA error, say")

        prefill._engine.step = broken  # the loop steps an idle engine with a connector now and then
        deadline = time.monotonic() + 10
        while prefill.fatal_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefill.fatal_error is not None
        transfer = FromPrefill(prefill.kv_addr)
        decode.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=4), transfer)
        started, outs = time.monotonic(), []
        while not outs and time.monotonic() - started < 30:
            outs = [o for o in decode.step() if o.finished]
            time.sleep(0.01)
        assert outs and outs[0].finish_reason == "error" and "stopped" in (outs[0].error or ""), outs
        assert decode.check_pool_free()
    finally:
        decode.close()
        prefill.shutdown()


def test_tcp_kv_data_that_cannot_be_sent_is_reported_as_failed():
    """The peer's data port does not answer (a firewall that opens only --kv-port, say): it hears
    Failed for the transfer on its control channel instead of waiting out its transfer timeout."""
    import socket

    import zmq

    from pdserve.disagg.transport.tcp import TcpTransport

    ctx = zmq.Context()
    control = ctx.socket(zmq.ROUTER)  # the peer's control port, with nothing on the port after it
    port = control.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port + 1), timeout=2):
        pass
    sender = TcpTransport("127.0.0.1", 0)
    sender.start(lambda msg, payload: None)
    try:
        sender.send(f"tcp://127.0.0.1:{port}", p.KVData(sender.address, "t1", [0], 8), bytearray(8))
        assert control.poll(20_000), "no word on the control channel"
        msg = p.decode(control.recv_multipart()[1])
        assert isinstance(msg, p.Failed) and msg.transfer_id == "t1", msg
    finally:
        sender.close()
        control.close(0)
        ctx.term()


def test_nccl_send_queued_on_a_closed_link_fails_at_once():
    """A send racing the link's close (a re-handshake replaces it): it fails now, its blocks come back
    and its peer is told, instead of sitting behind the end-of-jobs sentinel forever."""

    def no_store() -> Any:
        raise RuntimeError("no rendezvous in this test")

    class Blocks:
        released = False

        def done(self) -> None:
            self.released = True

    link = nccl.Link("pair", 0, no_store, torch.device("cpu"), "127.0.0.1")
    link.close(wait=5.0)
    blocks, reasons = Blocks(), []
    link.put(nccl._Send(blocks, reasons.append))  # type: ignore[arg-type]
    assert blocks.released and len(reasons) == 1, reasons  # "closed", or why it never connected


def test_idle_peers_whose_process_ended_are_forgotten():
    """A prefill lets go of a decode whose process has ended (its pool mapping, links, sockets) once
    nothing of it is pending, and of that peer only; a live one is kept."""

    class Ending(_FakeTcp):
        def __init__(self) -> None:
            super().__init__()
            self.ended: set[str] = set()
            self.forgotten: list[str] = []

        def peer_gone(self, peer: str) -> bool:
            return peer in self.ended

        def forget_peer(self, peer: str) -> None:
            self.forgotten.append(peer)

    transport = Ending()
    c = _decode_connector(transport)
    c._on_message(p.Reserve("fake://dead", "t1", [1, 2], {}, [0]), None)  # pending for a while
    c._on_message(p.Heartbeat("fake://alive"), None)
    transport.ended.add("fake://dead")
    _releases(c)
    assert transport.forgotten == []  # its transfer is still pending
    with c.sender.lock:
        c.sender.outgoing.clear()
    _releases(c)
    assert transport.forgotten == ["fake://dead"] and c.peers.known() == ["fake://alive"]
    _releases(c)
    assert transport.forgotten == ["fake://dead"]


def test_a_request_the_prefill_finds_wrong_fails_as_the_clients_error(model_dir):
    """The prefill instance refuses what the decode accepted (a shorter context, here): the request
    ends with an invalid_request error (the server's 400, which the router does not retry), not a
    prefill_failed one (502, retried on another prefill instance to the same end)."""
    prefill = Engine(
        EngineConfig(
            model=ModelConfig(path=model_dir, max_model_len=32),
            cache=CacheConfig(block_size=16, num_blocks=64),
            disagg=DisaggConfig(role="prefill", kv_transport="tcp"),
        )
    )
    decode = _engine(model_dir, "decode", "cpu", "tcp")
    try:
        assert prefill.connector is not None
        transfer = FromPrefill(prefill.connector.address)
        decode.add_request("r", list(range(1, 41)), SamplingParams(max_tokens=4), transfer)
        outs: list[Any] = []
        deadline = time.monotonic() + 30
        while not outs and time.monotonic() < deadline:
            prefill.step()
            outs = [o for o in decode.step() if o.finished]
            time.sleep(0.005)
        assert outs and (outs[0].error or "").startswith("invalid_request: the prefill instance"), outs
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        decode.close()
        prefill.close()


@pytest.mark.parametrize("kind", ["tcp", "cuda_ipc", pytest.param("nccl", marks=needs_two_gpus)])
@pytest.mark.gpu
@needs_gpu
def test_gpu_decode_reuses_a_cached_prefix(tiny_model, kind):
    """A second prompt extending the first: the decode instance keeps the cached leading blocks and the
    prefill writes only the rest (Reserve.cached_blocks), over every GPU path; outputs as colocated."""
    first = [(5 * j) % 400 + 2 for j in range(40)]  # 2 full blocks and a partial one
    second = first + [(11 * j) % 300 + 7 for j in range(30)]  # its 2 full blocks are cached by then
    llm = LLM(tiny_model, device="cuda:0", dtype="float32", num_blocks=256)
    try:
        expected = [c.token_ids for c in llm.generate_ids([first, second], GREEDY)]
    finally:
        llm.close()
    prefill = _engine(tiny_model, "prefill", "cuda:0", kind)
    decode = _engine(tiny_model, "decode", DECODE_GPU, kind)
    try:
        assert prefill.connector is not None and decode.connector is not None
        addr = prefill.connector.address
        got = _generate(decode, [prefill], addr, [first])
        before = decode.connector.bytes_received
        got += _generate(decode, [prefill], addr, [second])
        assert got == expected
        sent_blocks = -(-len(second) // 16) - 2
        assert decode.connector.bytes_received - before == sent_blocks * decode.connector.block_bytes
        assert decode.stats().kv_reused_tokens == 32
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()

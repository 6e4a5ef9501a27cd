"""Tensor parallelism (`tensor_parallel_size=2`): token for token the tp=1 output, and failures that end.

On the CPU the ranks are processes joined by Gloo. The small random-weight models cover every way of
cutting a model: Llama with KV heads split evenly, Qwen2 (qkv bias) with 3 KV heads over 2 ranks and an
odd, tied vocabulary, Qwen3 (q/k norm) with one KV head copied to both ranks. The default model splits
its 9 heads 6 + 3. Marked `gpu`: the same on cuda:0/1 over NCCL, bf16 with CUDA graphs, and a worker
killed in the middle of a step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config import DisaggConfig, EngineConfig, ModelConfig
from pdserve.distributed.driver import WorkerDiedError
from pdserve.distributed.group import TPGroup
from pdserve.distributed.sharding import head_shard, split
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.factory import build_kernels
from pdserve.layers.attention.registry import backend_class
from pdserve.models.loader import init_dummy
from pdserve.models.registry import model_class

from .conftest import MAX_NEW
from .tiny_models import BASE, TEXTS, save_tiny_model

ROOT = str(Path(__file__).resolve().parents[2])


def two_gpus(test: Callable[..., None]) -> Callable[..., None]:
    needs = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
    return pytest.mark.gpu(needs(test))


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512)
SHAPES = {  # each a different way to cut the model in two
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=192,
        num_attention_heads=6,
        num_key_value_heads=3,
        vocab_size=509,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
}


def save_shape(name: str, tmp_path_factory: pytest.TempPathFactory, prefix: str = "tp") -> str:
    """The small random-weight model of SHAPES[name], saved in a new temp dir."""
    shape = {**SMALL, **SHAPES[name]}
    path = str(tmp_path_factory.mktemp(f"{prefix}-{name}"))
    return save_tiny_model(path, shape.pop("model_type"), **shape)


def prompts_for(model: str, count: int) -> list[list[int]]:
    """`count` prompts of 4, 9, 14, ... tokens in the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.encode(t)[: 4 + 5 * i] for i, t in enumerate(TEXTS[:count])]


@pytest.fixture(scope="module", params=list(SHAPES))
def tiny_model(request, tmp_path_factory) -> str:
    return save_shape(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_model) -> list[list[int]]:
    return prompts_for(tiny_model, 8)  # 4 to 39 tokens


def _greedy(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [c.token_ids for c in llm.generate_ids(prompts, params)]


def _run(path: str, prompts: list[list[int]], passes: int = 1, **kwargs) -> list[list[list[int]]]:
    llm = LLM(path, num_blocks=128, block_size=4, **kwargs)
    try:
        outs = [_greedy(llm, prompts) for _ in range(passes)]
        assert llm.check_pool_free()
        return outs
    finally:
        llm.engine.runner.close()


# ---- the slices: pure functions and weights, no processes ----------------------------------------------


def test_split_is_balanced_and_covers_everything():
    for total in (1, 7, 509, 512):
        for parts in (1, 2, 3, 8):
            ranges = [split(total, parts, r) for r in range(parts)]
            assert ranges[0][0] == 0 and sum(size for _, size in ranges) == total
            assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            assert max(s for _, s in ranges) - min(s for _, s in ranges) <= 1


@pytest.mark.parametrize("heads,kv,tp", [(8, 2, 2), (9, 3, 2), (6, 3, 3), (4, 1, 2), (8, 2, 4), (32, 8, 8)])
def test_head_shards_keep_query_heads_with_their_kv_head(heads, kv, tp):
    shards = [head_shard(heads, kv, tp, r) for r in range(tp)]
    q_heads = [h for s in shards for h in range(s.q_start, s.q_start + s.q_heads)]
    assert q_heads == list(range(heads))  # each query head on exactly one rank, in order
    group = heads // kv
    for s in shards:
        assert s.q_heads >= 1 and s.kv_heads >= 1
        kv_of_q = {h // group for h in range(s.q_start, s.q_start + s.q_heads)}
        assert kv_of_q <= set(range(s.kv_start, s.kv_start + s.kv_heads))


@pytest.mark.parametrize("heads,kv,tp", [(8, 2, 3), (4, 4, 8), (8, 2, 0)])
def test_impossible_cuts_are_refused(heads, kv, tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        head_shard(heads, kv, tp, 0)


def test_dummy_weights_of_the_ranks_make_up_the_tp1_weights():
    from transformers import AutoConfig

    shape = {**BASE, **SMALL, **SHAPES["qwen2"], "eos_token_id": 1}
    cfg = AutoConfig.for_model(
        shape.pop("model_type"), **shape
    )  # uneven heads and vocabulary, qkv bias, tied
    models = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        kernels = build_kernels(KernelConfig(), torch.device("cpu"))
        model = model_class(cfg)(cfg, kernels, TPGroup(rank, size, torch.device("cpu")))
        init_dummy(model, seed=3)
        models.append(dict(model.named_parameters()))
    full, r0, r1 = models
    d = 32  # head_dim: 6 query heads in 3 KV groups; rank 0 takes 2 groups, rank 1 one
    qkv, bias = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.qkv_proj.bias"
    q, k, v = full[qkv].split([6 * d, 3 * d, 3 * d])
    assert torch.equal(r0[qkv], torch.cat([q[: 4 * d], k[: 2 * d], v[: 2 * d]]))
    assert torch.equal(r1[qkv], torch.cat([q[4 * d :], k[2 * d :], v[2 * d :]]))
    assert torch.equal(r1[bias][2 * d : 3 * d], full[bias][6 * d + 2 * d : 9 * d])  # k bias of KV head 2
    o = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([r0[o], r1[o]], dim=1), full[o])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(torch.cat([r0[down], r1[down]], dim=1), full[down])
    emb = "model.embed_tokens.weight"
    assert torch.equal(torch.cat([r0[emb], r1[emb]]), full[emb]) and r0[emb].shape[0] == 255
    assert torch.equal(r0["model.norm.weight"], full["model.norm.weight"])


def test_tp_config_checks():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ModelConfig(tensor_parallel_size=0)
    model = ModelConfig(tensor_parallel_size=2)
    EngineConfig(model=model)  # colocated
    EngineConfig(model=model, disagg=DisaggConfig(role="prefill"))
    EngineConfig(model=model, disagg=DisaggConfig(role="decode", kv_transport="cuda_ipc"))  # all ranks' pools


# ---- the engine over two CPU ranks ---------------------------------------------------------------------


def test_tp2_equals_tp1(tiny_model, tiny_prompts):
    """A batch of prompts of different lengths; tp=2 with chunked prefill (7 tokens a step) and a second
    pass served from the prefix cache."""
    (expected,) = _run(tiny_model, tiny_prompts)
    assert len({tuple(o) for o in expected}) > 4  # the prompts do lead to different outputs
    first, cached = _run(tiny_model, tiny_prompts, passes=2, tensor_parallel_size=2, max_num_batched_tokens=7)
    assert first == expected
    assert cached == expected


def test_default_model_tp2_equals_tp1(model_dir, prompt_ids, hf_greedy):
    """The tp=1 output is transformers' (test_greedy_equivalence holds it to `hf_greedy`), so tp=2 is
    held to that same reference: equal to it is equal to tp=1, without a tp=1 engine to load here."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    llm = LLM(model_dir, num_blocks=256, tensor_parallel_size=2)
    try:
        got = _greedy(llm, prompt_ids, params)
    finally:
        llm.engine.runner.close()
    for i, (two, one) in enumerate(zip(got, hf_greedy, strict=True)):
        assert two == one, f"prompt {i}: tp2 {two} != tp1 (transformers) {one}"


# ---- failures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tp-fail")), **SMALL)


LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def _kill_later(pid: int, delay: float) -> None:
    threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()


def _generate_until_it_fails(llm: LLM, limit_s: float) -> float:
    """Keep generating until a step raises WorkerDiedError; returns how long that took."""
    start = time.monotonic()
    with pytest.raises(WorkerDiedError):
        while time.monotonic() - start < limit_s:
            llm.generate_ids([[5, 6, 7]] * 4, LONG)
    return time.monotonic() - start


def test_killed_worker_fails_requests_instead_of_hanging(llama_dir):
    llm = LLM(llama_dir, num_blocks=128, tensor_parallel_size=2)
    try:
        assert len(_greedy(llm, [[1, 2, 3]])[0]) == 12  # the pair works
        (pid,) = llm.engine.runner.driver.worker_pids
        _kill_later(pid, 0.5)  # in the middle of a generation
        assert _generate_until_it_fails(llm, limit_s=30) < 30
        with pytest.raises(WorkerDiedError, match=f"rank 1 \\(pid {pid}\\) exited with code -9"):
            llm.generate_ids([[1, 2]], GREEDY)  # every later step fails at once, saying why
    finally:
        llm.engine.runner.close()


def test_killed_worker_ends_streams_with_an_error(llama_dir):
    from pdserve.engine.async_engine import AsyncEngine

    config = EngineConfig(model=ModelConfig(path=llama_dir, tensor_parallel_size=2))

    async def stream_until_finished(engine: AsyncEngine, worker: int):
        outputs = []
        async for out in engine.generate([1, 2, 3], LONG, "r1"):
            if not outputs:
                os.kill(worker, signal.SIGKILL)  # the request is in flight
            outputs.append(out)
        return outputs[-1]

    engine = AsyncEngine(config)
    engine.start(timeout=120)
    try:
        worker = engine._engine.runner.driver.worker_pids[0]
        last = asyncio.run(asyncio.wait_for(stream_until_finished(engine, worker), 30))
        assert last.finished and last.finish_reason == "error"
        assert "tensor-parallel worker rank 1" in (last.error or "")
        assert not engine.is_healthy()
    finally:
        engine.shutdown()
        engine._engine.runner.close()


def test_workers_exit_when_rank0_dies(llama_dir, tmp_path):
    script = textwrap.dedent(f"""
        from pdserve import LLM, SamplingParams
        llm = LLM({llama_dir!r}, num_blocks=64, tensor_parallel_size=2)
        llm.generate_ids([[1, 2, 3]], SamplingParams(max_tokens=2))
        print(llm.engine.runner.driver.worker_pids[0], flush=True)
        import time; time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        os.kill(worker, 0)  # alive
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived rank 0"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped counts as dead
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- two GPUs ------------------------------------------------------------------------------------------


@two_gpus
def test_gpu_tp2_float32_equals_tp1(tiny_model, tiny_prompts):
    torch.backends.cuda.matmul.allow_tf32 = False
    (expected,) = _run(tiny_model, tiny_prompts, device="cuda", dtype="float32")
    (got,) = _run(tiny_model, tiny_prompts, device="cuda", dtype="float32", tensor_parallel_size=2)
    assert got == expected


@two_gpus
def test_gpu_tp2_bfloat16_with_cuda_graphs(llama_dir):
    llm = LLM(llama_dir, device="cuda", dtype="bfloat16", num_blocks=256, tensor_parallel_size=2)
    try:
        runner = llm.engine.runner
        assert (runner.graphs is not None) == backend_class(runner.kernels).cuda_graph_safe
        prompts = [[1 + i, 2, 3] * (1 + i) for i in range(12)]
        sampled = llm.generate_ids(prompts, SamplingParams(temperature=0.8, max_tokens=24, seed=1))
        assert all(len(o.token_ids) >= 1 and o.error is None for o in sampled)
        assert runner.kv_cache.dtype == torch.bfloat16
        assert llm.check_pool_free()
    finally:
        llm.engine.runner.close()  # drops the graphs, then NCCL: must not block


KILL_SCRIPT = """
import os, signal, sys, threading, time
from pdserve import LLM, SamplingParams
from pdserve.distributed.driver import WorkerDiedError
llm = LLM(sys.argv[1], device="cuda", dtype="bfloat16", num_blocks=256, tensor_parallel_size=2)
params = SamplingParams(max_tokens=400, ignore_eos=True)
llm.generate_ids([[1, 2, 3]], params)
threading.Timer(1.0, os.kill, (llm.engine.runner.driver.worker_pids[0], signal.SIGKILL)).start()
start = time.monotonic()
try:
    while time.monotonic() - start < 60:
        llm.generate_ids([[5, 6, 7]] * 4, params)
except WorkerDiedError as e:
    print(f"failed after {time.monotonic() - start:.1f}s: {e}", flush=True)
llm.engine.runner.close()
"""


@two_gpus
def test_gpu_killed_worker_fails_requests_and_exits(llama_dir):
    """In its own process: NCCL never fails a collective whose peer died, and the GPU may stay stuck in
    it; rank 0 must still raise, close and exit (teardown that would wait on the GPU is skipped)."""
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, llama_dir], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed after" in done.stdout and "exited with code -9" in done.stdout, done.stdout
    assert float(done.stdout.split("failed after ")[1].split("s:")[0]) < 60

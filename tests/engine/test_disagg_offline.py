"""Disaggregated engines in one process (in-process transport): same greedy output, KV really moved,
failures end requests and free every block."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pdserve import LLM, SamplingParams
from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig
from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.engine import Engine

from .conftest import MAX_NEW

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


@pytest.mark.parametrize(("prefill", "decode", "transport"), [(1, 1, "tcp"), (2, 2, "inproc")])
def test_disaggregated_greedy_equals_transformers(
    model_dir, prompt_ids, hf_greedy, prefill, decode, transport
):
    llm = LLM(model_dir, num_blocks=256, prefill=prefill, decode=decode, kv_transport=transport)
    try:
        got = [c.token_ids for c in llm.generate_ids(prompt_ids, GREEDY)]
        assert got == hf_greedy
        assert all(e.num_prefill_tokens == 0 for e in llm.engines), "a decode engine ran a prompt"
        # every prompt token is computed by a prefill engine or found in its prefix cache (prompts that
        # share a first block hit it when an earlier one finished first: timing, not a fault)
        computed = sum(p.num_prefill_tokens + p.stats().prefix_cache_hits for p in llm.prefill_engines)
        assert computed == sum(len(p) for p in prompt_ids)
        assert all(e.connector and e.connector.bytes_received > 0 for e in llm.engines)
        assert llm.check_pool_free()
        secrets = {e.config.disagg.cluster_secret for e in [*llm.engines, *llm.prefill_engines]}
        assert len(secrets) == 1 and (None in secrets) == (transport == "inproc"), "tcp runs unauthenticated"
    finally:
        llm.close()


def test_seeded_sampling_same_as_colocated(model_dir, prompt_ids):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    colocated = LLM(model_dir, num_blocks=256)
    disagg = LLM(model_dir, num_blocks=256, prefill=1, decode=1)
    try:
        a = [c.token_ids for c in colocated.generate_ids(prompt_ids[:4], params)]
        b = [c.token_ids for c in disagg.generate_ids(prompt_ids[:4], params)]
        assert a == b
    finally:
        disagg.close()


def _engine(model_dir: str, role: str, block_size: int = 16, **disagg) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(path=model_dir),
            cache=CacheConfig(block_size=block_size, num_blocks=128),
            disagg=DisaggConfig(role=role, kv_transport="inproc", **disagg),
        )
    )


def _run(engines: list[Engine], request_id: str, deadline: float = 30.0):
    outs = []
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for e in engines:
            outs.extend(o for o in e.step() if o.request_id == request_id)
        if outs and outs[-1].finished:
            return outs
        time.sleep(0.01)
    raise AssertionError("request did not finish in time")


def test_layout_mismatch_refused_at_handshake(model_dir):
    prefill, decode = _engine(model_dir, "prefill", block_size=16), _engine(model_dir, "decode", block_size=8)
    try:
        assert prefill.connector and decode.connector
        decode.add_request("r", [1, 2, 3, 4, 5], GREEDY, FromPrefill(prefill.connector.address))
        last = _run([decode, prefill], "r")[-1]
        assert last.finish_reason == "error"
        assert "KV layout mismatch" in (last.error or "")
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


def test_dead_prefill_fails_request_and_frees_blocks(model_dir):
    decode = _engine(model_dir, "decode", peer_timeout=1.0)
    try:
        decode.add_request("r", list(range(1, 40)), GREEDY, FromPrefill("inproc://nobody"))
        t = time.monotonic()
        last = _run([decode], "r")[-1]
        assert last.finish_reason == "error" and "stopped answering" in (last.error or "")
        assert time.monotonic() - t < 5
        assert decode.check_pool_free()
    finally:
        decode.close()


def test_transfer_timeout_frees_both_sides(model_dir):
    prefill = _engine(model_dir, "prefill")
    decode = _engine(model_dir, "decode", kv_transfer_timeout=0.5)
    try:
        assert prefill.connector
        decode.add_request("r", list(range(1, 40)), GREEDY, FromPrefill(prefill.connector.address))
        decode.step()  # reserve sent; the prefill engine is never stepped, so nothing comes back
        time.sleep(1.2)
        last = _run([decode], "r")[-1]
        assert last.finish_reason == "error" and "timed out" in (last.error or "")
        prefill.step()  # the prefill side heard the abort
        assert decode.check_pool_free() and prefill.check_pool_free()
    finally:
        prefill.close()
        decode.close()


def test_decode_abort_reaches_prefill(model_dir):
    prefill, decode = _engine(model_dir, "prefill"), _engine(model_dir, "decode")
    try:
        assert prefill.connector
        decode.add_request("r", list(range(1, 40)), GREEDY, FromPrefill(prefill.connector.address))
        decode.step()
        decode.abort_request("r")
        assert _run([decode], "r")[-1].finish_reason == "abort"
        prefill.step()
        assert decode.check_pool_free() and prefill.check_pool_free()
        assert prefill.num_prefill_tokens == 0
    finally:
        prefill.close()
        decode.close()


def test_colocated_refuses_kv_transfer(model_dir):
    from pdserve.errors import InvalidRequestError

    engine = Engine(
        EngineConfig(model=ModelConfig(path=model_dir), cache=replace(CacheConfig(), num_blocks=64))
    )
    with pytest.raises(InvalidRequestError):
        engine.add_request("r", [1, 2, 3], GREEDY, FromPrefill("tcp://127.0.0.1:1"))

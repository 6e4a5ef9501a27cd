"""Greedy output equals transformers', whatever the batching, chunking, prefix caching or preemption."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams

from .conftest import MAX_NEW

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def _check(llm: LLM, prompt_ids, expected, one_at_a_time: bool = False) -> None:
    if one_at_a_time:
        got = [llm.generate_ids([ids], GREEDY)[0].token_ids for ids in prompt_ids]
    else:
        got = [c.token_ids for c in llm.generate_ids(prompt_ids, GREEDY)]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i}: pdserve {g} != transformers {e}"
    assert llm.engine.check_pool_free()


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, num_blocks=512, enable_prefix_caching=False)


def test_one_at_a_time(llm, prompt_ids, hf_greedy):
    _check(llm, prompt_ids, hf_greedy, one_at_a_time=True)


def test_all_at_once(llm, prompt_ids, hf_greedy):
    _check(llm, prompt_ids, hf_greedy)


def test_chunked_prefill_small_budget(model_dir, prompt_ids, hf_greedy):
    small = LLM(model_dir, num_blocks=512, max_num_batched_tokens=7, enable_prefix_caching=False)
    _check(small, prompt_ids, hf_greedy)


def test_prefix_cache_hits(model_dir, prompt_ids, hf_greedy):
    cached = LLM(model_dir, num_blocks=512, block_size=4)
    _check(cached, prompt_ids, hf_greedy)
    _check(cached, prompt_ids, hf_greedy)  # second pass: prompts (and outputs) come from the cache
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits > 0.5 * stats.prefix_cache_queries / 2


def test_preemption(model_dir, prompt_ids, hf_greedy):
    tiny = LLM(model_dir, num_blocks=40, block_size=4, enable_prefix_caching=False)
    _check(tiny, prompt_ids, hf_greedy)
    assert tiny.engine.stats().num_preemptions > 0


@pytest.mark.parametrize(
    ("kwargs", "singles"),
    [
        ({"num_blocks": 512, "enable_prefix_caching": False}, True),
        ({"num_blocks": 512, "block_size": 4}, True),  # prefix cache, with ahead steps filling blocks
        # preemption, short pool: one prompt at a time never fills it, so that pass would repeat the
        # two above (4-token blocks filled by ahead steps, a lone sequence launched ahead)
        ({"num_blocks": 40, "block_size": 4, "enable_prefix_caching": False}, False),
    ],
    ids=["plain", "prefix-cache", "preemption"],
)
def test_overlapped_steps_and_steps_launched_ahead(model_dir, prompt_ids, hf_greedy, kwargs, singles):
    """Forced on the CPU (by default only CUDA overlaps): outputs built during the next step, and
    decode steps launched before the previous one is collected (engine/ahead.py)."""
    llm = LLM(model_dir, overlap_outputs=True, **kwargs)
    _check(llm, prompt_ids, hf_greedy)
    if singles:
        _check(llm, prompt_ids, hf_greedy, one_at_a_time=True)
    else:
        assert llm.engine.stats().num_preemptions > 0

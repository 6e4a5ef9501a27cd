"""Sampling values past what the float32 sampler can carry pick what their limits pick, never NaN:
a temperature near 0 is greedy, a top_p near 0 keeps the top token, a near-0 repetition penalty
behaves as the smallest one float32 carries (engine/sampling.py: GREEDY_BELOW, FLOAT32_SAFE)."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.sampling import FLOAT32_SAFE

from .conftest import MAX_NEW

ROWS = (0, 1, 3, 10)  # of tests/engine/conftest.py's prompts: short, code, a long text, a chat


@pytest.fixture(scope="module")
def llm(model_dir: str) -> LLM:
    return LLM(model_dir, num_blocks=512)


def _tokens(llm: LLM, prompt_ids: list[list[int]], **kwargs: float | int) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, **kwargs)  # type: ignore[arg-type]
    return [c.token_ids for c in llm.generate_ids(prompt_ids, params)]


def test_values_float32_cannot_carry_pick_what_their_limits_pick(
    llm: LLM, prompt_ids: list[list[int]], hf_greedy: list[list[int]]
) -> None:
    # every extreme acts on each row of the sampler alike: a few prompts (text, code, a chat) prove it
    prompt_ids, hf_greedy = [prompt_ids[i] for i in ROWS], [hf_greedy[i] for i in ROWS]
    greedy = _tokens(llm, prompt_ids, temperature=0.0)
    assert [g[: len(h)] for g, h in zip(greedy, hf_greedy, strict=True)] == hf_greedy
    # 1 / 1e-38 overflows float32: unmoved, every logit would be +-inf, softmax NaN, token 0 every step
    assert _tokens(llm, prompt_ids, temperature=1e-38, seed=1) == greedy  # seed: the torch sampler
    assert _tokens(llm, prompt_ids, temperature=1e-38) == greedy
    # 1e-46 is 0 in float32: unmoved, top_p would drop every token
    assert _tokens(llm, prompt_ids, temperature=1.0, top_p=1e-46, seed=2) == greedy
    tiny = _tokens(llm, prompt_ids, temperature=0.0, repetition_penalty=1e-50)  # 0 in float32
    assert tiny == _tokens(llm, prompt_ids, temperature=0.0, repetition_penalty=1 / FLOAT32_SAFE)
    assert tiny != greedy  # the penalty still applies


def test_params_move_inside_float32_and_keep_in_range_values() -> None:
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(temperature=1e300).temperature == FLOAT32_SAFE
    assert SamplingParams(top_p=1e-300).top_p == 1 / FLOAT32_SAFE
    assert SamplingParams(repetition_penalty=1e-300).repetition_penalty == 1 / FLOAT32_SAFE
    assert SamplingParams(repetition_penalty=1e300).repetition_penalty == FLOAT32_SAFE
    kept = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.05)
    assert (kept.temperature, kept.top_p, kept.repetition_penalty) == (0.7, 0.9, 1.05)

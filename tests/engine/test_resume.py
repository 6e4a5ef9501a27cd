"""Resume (issue 25, R2-R4) in the offline engine: a request resumed with the first k outputs of an
uninterrupted run gives exactly that run's remaining tokens and text, colocated and disaggregated,
greedy and seeded, with a stop string and with penalties; seeded draws depend on (seed, position) only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.llm import Completion
from pdserve.engine.resume import Resume
from pdserve.errors import InvalidRequestError

CUTS = (1, 7)  # outputs already generated when the request is resumed
MAX = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX)
SEEDED = SamplingParams(temperature=0.8, seed=4321, max_tokens=MAX)
PENALIZED = SamplingParams(temperature=0.0, max_tokens=MAX, repetition_penalty=1.3, frequency_penalty=0.6)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLM(model_dir, num_blocks=256)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(prompt_ids) -> list[list[int]]:
    return [prompt_ids[3], prompt_ids[10]]  # a long text, a chat


def chars_sent(tokenizer, prompt: list[int], outputs: list[int], params: SamplingParams) -> int:
    """The characters of text a stream of `outputs` has handed out (the engine's own detokenizer)."""
    detok = Detokenizer(tokenizer, prompt, params.stop, params.skip_special_tokens)
    for i, t in enumerate(outputs):
        detok.add_token(t, check_stop=i + 1 >= params.min_tokens)
        detok.take(False)
    return detok.sent


def resumed_runs(
    llm: LLM, prompts: list[list[int]], full: list[Completion], params: SamplingParams
) -> list[tuple[Completion, Completion, int]]:
    """Every prompt resumed at every cut (all in one batch): (full run, resumed run, cut)."""
    jobs = [(i, k) for i, c in enumerate(full) for k in CUTS if k < len(c.token_ids)]
    resumes: list[Resume | None] = []
    for i, k in jobs:
        outs = full[i].token_ids[:k]
        resumes.append(Resume(tuple(outs), chars_sent(llm.tokenizer, prompts[i], outs, params)))
    got = llm.generate_ids([prompts[i] for i, _ in jobs], params, resumes)
    return [(full[i], g, k) for (i, k), g in zip(jobs, got, strict=True)]


def assert_continues(llm: LLM, prompts: list[list[int]], params: SamplingParams, full=None) -> None:
    full = full or llm.generate_ids(prompts, params)
    runs = resumed_runs(llm, prompts, full, params)
    assert runs, "no cut point fell inside an answer"
    for whole, resumed, k in runs:
        prompt = whole.prompt_token_ids
        assert resumed.token_ids == whole.token_ids[k:], f"cut {k}"
        sent = chars_sent(llm.tokenizer, prompt, whole.token_ids[:k], params)
        assert resumed.text == whole.text[sent:], f"cut {k}"
        assert resumed.finish_reason == whole.finish_reason
    assert llm.check_pool_free()


@pytest.mark.parametrize("params", [GREEDY, SEEDED, PENALIZED], ids=["greedy", "seeded", "penalties"])
def test_resumed_request_continues_the_uninterrupted_run(llm, prompts, params):
    assert_continues(llm, prompts, params)


def test_resume_with_a_stop_string(llm, prompts):
    free = llm.generate_ids(prompts[:1], GREEDY)[0]
    stop = free.text[len(free.text) // 2 :][:3]  # a stop string the answer meets halfway
    params = replace(GREEDY, stop=[stop])
    full = llm.generate_ids(prompts[:1], params)
    assert full[0].finish_reason == "stop" and stop not in full[0].text
    assert_continues(llm, prompts[:1], params, full)


def test_seeded_draws_depend_on_seed_and_position_only(llm, prompts):
    alone = llm.generate_ids(prompts[:1], SEEDED)[0].token_ids
    batched = [c.token_ids for c in llm.generate_ids(prompts, SEEDED)]
    assert alone == batched[0]
    other = llm.generate_ids(prompts[:1], replace(SEEDED, seed=4322))[0].token_ids
    assert other != alone, "the seed changes nothing"


def test_resumed_outputs_that_end_the_request_finish_it_at_once(llm, prompts):
    params = replace(GREEDY, max_tokens=6)
    full = llm.generate_ids(prompts[:1], params)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 6
    sent = chars_sent(llm.tokenizer, full.prompt_token_ids, full.token_ids, params)
    resumed = llm.generate_ids(prompts[:1], params, [Resume(tuple(full.token_ids), sent)])[0]
    assert resumed.token_ids == [] and resumed.finish_reason == "length"
    assert resumed.text == full.text[sent:]
    whole = llm.generate_ids(prompts[:1], params, [Resume(tuple(full.token_ids[:2]), 0, whole_text=True)])
    assert whole[0].text == full.text, "a non-streamed answer holds the whole text"
    assert llm.check_pool_free()


@pytest.mark.parametrize(
    ("resume", "says"),
    [
        (Resume((), 0), "must not be empty"),
        (Resume((10**7,), 0), "must be in"),
        (Resume((42, 43), 10_000), "text_chars_sent"),
        (Resume((42,) * 9000, 0), "context"),
    ],
)
def test_invalid_resume_is_refused(llm, prompts, resume, says):
    with pytest.raises(InvalidRequestError, match=says):
        llm.engine.add_request("bad", prompts[0], GREEDY, resume=resume)
    assert llm.check_pool_free()


def test_disaggregated_resume_continues_the_colocated_run(llm, model_dir, prompts):
    disagg = LLM(model_dir, num_blocks=256, prefill=1, decode=1, kv_transport="tcp")
    try:
        for params in (GREEDY, SEEDED):
            full = llm.generate_ids(prompts, params)  # colocated: the reference
            runs = resumed_runs(disagg, prompts, full, params)
            for whole, resumed, k in runs:
                assert resumed.token_ids == whole.token_ids[k:], f"cut {k}"
                assert resumed.error is None
        assert all(e.num_prefill_tokens == 0 for e in disagg.engines), "a decode engine ran a prompt"
        assert disagg.check_pool_free()
    finally:
        disagg.close()


def test_reserve_carries_num_output_tokens_within_its_prompt():
    from pdserve.disagg import protocol as p

    reserve = p.Reserve("tcp://127.0.0.1:5000", "t1", [1, 2, 3], {}, [0], num_output_tokens=2)
    assert p.decode(p.encode(reserve)) == reserve
    for bad in (3, -1, True, 1.0):  # at least one prompt token stays a prompt's
        with pytest.raises(ValueError, match="num_output_tokens"):
            p.decode(p.encode(replace(reserve, num_output_tokens=bad)))

"""Structured output in the offline engine with the real default model: a batch mixing constrained
and free rows leaves the free rows' tokens as they are alone; a resumed constrained request continues
its grammar from its outputs; in a disaggregated pair (tcp: the Reserve's params cross the real
protocol) the prefill instance constrains the first token and the decode instance continues the
grammar from it, token for token as colocated, greedy and seeded, and resumed too."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.resume import Resume
from pdserve.errors import InvalidRequestError
from pdserve.structured import GrammarSpec

# First tokens the model would never pick unconstrained: the prefill instance must apply the grammar
# or the decode instance's matcher refuses the first token (the request fails).
CHOICE = GrammarSpec("choice", json.dumps(["zebra crossing", "quokka smile"]))
REGEX = GrammarSpec("regex", r"Q[0-9]{2}-(alpha|beta)-[a-z]{3,8}")
SCHEMA = {
    "type": "object",
    "properties": {"pet": {"enum": ["cat", "dog"]}, "age": {"type": "integer"}, "name": {"type": "string"}},
    "required": ["pet", "age", "name"],
}
JSON = GrammarSpec("json_schema", json.dumps(SCHEMA))
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
SEEDED = SamplingParams(temperature=1.0, seed=77, max_tokens=24)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLM(model_dir, num_blocks=256, max_num_seqs=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(prompt_ids) -> list[list[int]]:
    return [prompt_ids[0], prompt_ids[10]]  # a text, a chat


def check(spec: GrammarSpec, text: str) -> bool:
    if spec is CHOICE:
        return text in json.loads(CHOICE.spec)
    if spec is REGEX:
        return re.fullmatch(REGEX.spec, text) is not None
    value = json.loads(text)
    return value["pet"] in ("cat", "dog") and isinstance(value["age"], int) and isinstance(value["name"], str)


def test_a_batch_mixes_constrained_and_free_rows(llm, prompts):
    free_alone = llm.generate_ids(prompts, GREEDY)
    specs = [CHOICE, JSON]
    mixed = [p for p in prompts for _ in range(len(specs) + 1)]
    params = [replace(GREEDY, structured=s, max_tokens=40) for s in specs] + [GREEDY]
    engine = llm.engine
    for i, ids in enumerate(mixed):
        engine.add_request(f"mix-{i}", ids, params[i % len(params)])
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i in range(len(mixed)):
        tokens, spec = done[f"mix-{i}"], params[i % len(params)].structured
        if spec is None:
            assert tokens == free_alone[i // len(params)].token_ids, "a free row changed in a mixed batch"
        else:
            text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
            assert check(spec, text), (spec.kind, text)
    assert llm.check_pool_free()


def test_resume_continues_the_grammar(llm, prompts):
    params = replace(GREEDY, structured=JSON, max_tokens=40)
    full = llm.generate_ids(prompts[:1], params)[0]
    assert full.finish_reason == "stop" and check(JSON, full.text), full.text
    cuts = (1, 5)
    resumes: list[Resume | None] = [Resume(tuple(full.token_ids[:k]), 0, whole_text=True) for k in cuts]
    for k, resumed in zip(cuts, llm.generate_ids(prompts[:1] * len(cuts), params, resumes), strict=True):
        assert resumed.token_ids == full.token_ids[k:] and resumed.text == full.text, f"cut {k}"
    off_grammar = tuple(llm.tokenizer.encode("Hello", add_special_tokens=False))
    with pytest.raises(InvalidRequestError, match="do not match the structured output"):
        llm.engine.add_request("bad", prompts[0], params, resume=Resume(off_grammar, 0))
    assert llm.check_pool_free()


def test_disaggregated_pair_constrains_the_first_token_and_continues(llm, model_dir, prompts):
    disagg = LLM(model_dir, num_blocks=256, prefill=1, decode=1, kv_transport="tcp")
    try:
        params = replace(SEEDED, structured=REGEX, max_tokens=40)
        colocated = llm.generate_ids(prompts, params)
        for c, d in zip(colocated, disagg.generate_ids(prompts, params), strict=True):
            assert d.error is None, d.error
            assert d.token_ids == c.token_ids and check(REGEX, d.text), (d.text, c.text)
        params = replace(GREEDY, structured=JSON, max_tokens=40)
        full = llm.generate_ids(prompts[:1], params)[0]
        runs = disagg.generate_ids(
            prompts[:1] * 2, params, [None, Resume(tuple(full.token_ids[:3]), 0, True)]
        )
        assert runs[0].token_ids == full.token_ids and check(JSON, runs[0].text)
        assert runs[1].token_ids == full.token_ids[3:], "the prefill instance replays the resumed outputs"
        assert disagg.check_pool_free()
    finally:
        disagg.close()


def test_steps_launched_ahead_sample_constrained_rows_as_waited_steps(llm, model_dir, prompts):
    """Overlap forced on the CPU: with a grammar constraining rows at every step, decode steps are
    still launched ahead (their sampling queued once the previous tokens are accepted), and every
    row, constrained, penalized or free, gets the tokens of the engine that waits for each step."""
    long_text = GrammarSpec("regex", "[a-z ]{300}")  # constrains every one of the 16 tokens
    params = [
        replace(GREEDY, structured=long_text, max_tokens=16),
        replace(GREEDY, structured=JSON, max_tokens=16, repetition_penalty=1.3),
        replace(GREEDY, max_tokens=16),
    ]
    batch = [p for p in prompts for _ in params]
    per_row = params * len(prompts)
    waited = llm.generate_ids(batch, per_row)
    ahead = LLM(model_dir, num_blocks=256, max_num_seqs=8, overlap_outputs=True)
    try:
        launched = ahead.generate_ids(batch, per_row)
        assert ahead.engine.num_steps_ahead > 0, "no step was launched ahead of a constrained batch"
        assert ahead.check_pool_free()
    finally:
        ahead.close()
    for i, (w, a) in enumerate(zip(waited, launched, strict=True)):
        assert a.token_ids == w.token_ids, f"row {i}: {a.text!r} != {w.text!r}"
    assert re.fullmatch("[a-z ]+", waited[0].text), waited[0].text

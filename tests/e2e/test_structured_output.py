"""Structured output over real HTTP with the openai SDK: a colocated server (the shared `server`) and a
1P1D pair behind the router (the shared `pair`, tests/e2e/conftest.py). A nested JSON schema (objects
in objects, an enum, an array, required fields) gives output `jsonschema` validates for 20 prompts,
streamed and not, greedy and sampled; vLLM's regex and choice fields hold too; a schema the engine
cannot compile and an unsupported response_format are 400s that name the field. Through the pair, the choice
words are ones the model would never start with unconstrained: the prefill instance must constrain
the first token, or the decode instance refuses it."""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, MODEL, ServerProcess
from tests.e2e.cluster import Instance, Pair, metric

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "species": {"enum": ["cat", "dog", "parrot"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "city": {"type": "string", "maxLength": 8},
            },
            "required": ["name", "city"],
            "additionalProperties": False,
        },
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 1},
    },
    "required": ["name", "species", "age", "owner", "toys"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
PETS = ["a cat", "a dog", "a parrot", "an old cat", "a puppy"]
MAX_TOKENS = 120
CHOICES = ["zebra crossing", "quokka smile"]
MODES = [
    (stream, temp) for stream in (False, True) for temp in (0.0, 1.0)
]  # no answer to "Hi" starts like these unconstrained


def ask(client: openai.OpenAI, i: int, stream: bool, temperature: float) -> tuple[str, str | None]:
    """Prompt i's answer in the schema: (text, finish_reason)."""
    messages = [
        {"role": "user", "content": f"Invent {PETS[i % len(PETS)]} number {i} and its owner, as JSON."}
    ]
    kw: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
    kw |= {"temperature": temperature, "seed": i, "response_format": RESPONSE_FORMAT}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content or "", choice.finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def schema_answers(client: openai.OpenAI, count: int) -> list[str]:
    """`count` prompts at once, each streamed or not, greedy or sampled (seeded); every answer
    validates. Prompt i's mode is MODES[i % 4]."""
    jobs = [(i, *MODES[i % len(MODES)]) for i in range(count)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    for (i, stream, temp), (text, reason) in zip(jobs, answers, strict=True):
        assert reason == "stop", (i, stream, temp, reason, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    return [text for text, _ in answers]


def assert_regex_and_choice(client: openai.OpenAI) -> None:
    """A choice and a regex, greedy and sampled, at once."""
    regex = r"ID-[0-9]{4}-(red|blue)"
    fields = [{"guided_choice": CHOICES}, {"structured_outputs": {"regex": regex}}]
    jobs = [(extra, temp) for extra in fields for temp in (0.0, 1.0)]

    def one(job: tuple[dict[str, Any], float]) -> str:
        messages = [{"role": "user", "content": "Hi"}]
        got = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=job[1], max_tokens=20, extra_body=job[0]
        )
        return got.choices[0].message.content or ""

    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(one, jobs))
    assert texts[0] in CHOICES and texts[1] in CHOICES, texts
    assert re.fullmatch(regex, texts[2]) and re.fullmatch(regex, texts[3]), texts


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def pair_client(pair: Pair) -> openai.OpenAI:
    """The SDK on the `pair` cluster's router (the 1P1D fixture test_internal_auth.py shares)."""
    return openai.OpenAI(base_url=f"{pair.router.url}/v1", api_key="none", max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def colocated(client: openai.OpenAI) -> list[str]:
    return schema_answers(client, 20)


def test_structured_output_colocated(client: openai.OpenAI, colocated: list[str]) -> None:
    assert len(colocated) == 20  # each validated by jsonschema
    assert_regex_and_choice(client)
    refused = {
        "structured": {"extra_body": {"guided_json": {"type": "object", "properties": {"a": {"type": 5}}}}},
        "response_format.type": {"response_format": {"type": "yaml"}},
        "structured_outputs": {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}},
    }
    for param, kw in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **kw)
        assert e.value.body and e.value.body.get("param") == param, e.value.body  # type: ignore[union-attr]


def test_structured_output_through_a_disaggregated_pair(
    pair_client: openai.OpenAI, colocated: list[str]
) -> None:
    """Greedy and seeded draws give the colocated answers, token for token (R4: seed and position)."""
    assert schema_answers(pair_client, 4) == colocated[:4]
    assert_regex_and_choice(pair_client)


# ---- n > 1 through the pair: one prefill, n choices forked on the decode instance --------------------------


BLOCK = 16  # the instances' KV block size (the default)


def prompt_counts(instance: Instance) -> tuple[float, float]:
    """An instance's /metrics: (prompt tokens its requests looked up in its prefix cache, prompt tokens
    it ran through its model)."""
    text = instance.get("/metrics").text
    return metric(text, "pdserve_prefix_cache_queries_total"), metric(text, "pdserve_prompt_tokens_computed")


def test_n_choices_share_one_prefill(pair: Pair, pair_client: openai.OpenAI, client: openai.OpenAI) -> None:
    """n = 3 through the router: the prefill instance counts (and computes) the prompt once, each
    choice draws on its own (seed + index) as it does colocated, the stream gives the same choices as
    the answer, usage counts the prompt once, and greedy choices are all one answer."""
    prompt = f"Request {uuid.uuid4().hex[:8]}: a poem about the sea, the wind, the gulls and the old boats."
    kw: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 1.0, "seed": 11}
    kw["extra_body"] = {"ignore_eos": True}
    before, decode_before = prompt_counts(pair.prefill), prompt_counts(pair.decode)[1]
    answer = pair_client.completions.create(n=3, **kw)
    used = answer.usage
    assert used is not None and used.completion_tokens == 12, used
    length = used.prompt_tokens
    assert length > BLOCK and used.prompt_tokens_details.cached_tokens == 0, used  # type: ignore[union-attr]
    assert prompt_counts(pair.prefill) == (before[0] + length, before[1] + length), "prompt prefilled twice"
    tail = length - (length - 1) // BLOCK * BLOCK  # after the last full block: the other choices' own
    assert prompt_counts(pair.decode)[1] == decode_before + 2 * tail
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(answer.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3, texts  # seeded seed, seed + 1, seed + 2: three draws
    colocated = client.completions.create(n=3, **kw).choices
    assert [c.text for c in sorted(colocated, key=lambda c: c.index)] == texts
    streamed = ["", "", ""]
    usage = None
    options = {"include_usage": True}
    for chunk in pair_client.completions.create(n=3, stream=True, stream_options=options, **kw):  # type: ignore[arg-type]
        for c in chunk.choices:
            streamed[c.index] += c.text
        usage = chunk.usage or usage
    assert streamed == texts
    assert usage is not None and usage.prompt_tokens == used.prompt_tokens
    many = pair_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0.0, n=3
    )
    assert len(many.choices) == 3 and len({c.message.content for c in many.choices}) == 1, many.choices
    assert pair.decode.wait_pool_free()["pool_free"] and pair.prefill.wait_pool_free()["pool_free"]


def test_tokenize_and_detokenize_through_the_router(pair: Pair) -> None:
    """The router has no tokenizer: it forwards /tokenize and /detokenize to an instance, whose
    answers (a completion prompt, chat messages through the template, an error) it passes on as they are."""
    bodies = [
        ("/tokenize", {"model": MODEL, "prompt": "The capital of France is"}),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/detokenize", {"model": MODEL, "tokens": [504, 3575, 282, 4649, 314]}),
        ("/detokenize", {"model": MODEL, "tokens": "not a list"}),
    ]
    with httpx.Client(timeout=60) as http:
        for path, body in bodies:
            routed = http.post(f"{pair.router.url}{path}", json=body)
            direct = http.post(f"{pair.decode.url}{path}", json=body)
            assert (routed.status_code, routed.json()) == (direct.status_code, direct.json()), path
        assert routed.status_code == 400

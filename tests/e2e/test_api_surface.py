"""The rest of OpenAI's surface and the answer parsers, end to end: the shared `server` (conftest.py;
started with --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser hermes), real
HTTP (the openai SDK and httpx). The small default model writes no think tags or tool calls by itself, so the
parser tests force them: a request that resumes (issue 25's `resume`) from the tokens of a recorded
Qwen answer goes through the real request path, engine, detokenizer, parsers and stream, and the
model continues it; a logit_bias of +100 on the end-of-turn token makes it stop right there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, MODEL, ServerProcess

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0.0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c


def one_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


# ---- item 4: logit_bias, echo, prompt batches, budgets, usage, tokenize ------------------------------------


def test_logit_bias_forces_and_bans(client: OpenAI, tokenizer: Any) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, **GREEDY)
    first = one_token(tokenizer, plain.choices[0].text)
    banned = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, logit_bias={str(first): -100}, **GREEDY
    )
    assert (
        banned.choices[0].text
        and tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    )
    forced = one_token(tokenizer, " banana")
    for sampling in (GREEDY, {"temperature": 1.0, "seed": 7}):
        out = client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=4,
            logit_bias={str(forced): 100},
            **sampling,  # type: ignore[arg-type]
        )
        assert out.choices[0].text == " banana" * 4, sampling
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=3,
        logit_bias={str(forced): 100},
        **GREEDY,  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.content == " banana" * 3


def test_echo_token_arrays_and_prompt_batches_equal_single_prompts(client: OpenAI, tokenizer: Any) -> None:
    other = "Water boils at"
    single = [
        client.completions.create(model=MODEL, prompt=x, max_tokens=4, **GREEDY) for x in (PROMPT, other)
    ]
    texts = [s.choices[0].text for s in single]
    ids = [tokenizer.encode(x) for x in (PROMPT, other)]
    assert (
        client.completions.create(model=MODEL, prompt=ids[0], max_tokens=4, **GREEDY).choices[0].text
        == texts[0]
    )
    for batch in ([PROMPT, other], ids):
        out = client.completions.create(model=MODEL, prompt=batch, max_tokens=4, n=2, **GREEDY)  # type: ignore[arg-type]
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == [texts[0], texts[0], texts[1], texts[1]]
        assert out.usage is not None and out.usage.prompt_tokens == len(ids[0]) + len(ids[1])
        assert out.usage.completion_tokens == sum(2 * s.usage.completion_tokens for s in single if s.usage)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == PROMPT + texts[0]
    echoed_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=4, echo=True, **GREEDY)
    assert echoed_ids.choices[0].text == tokenizer.decode(ids[1]) + texts[1]
    stream = client.completions.create(
        model=MODEL, prompt=[PROMPT, other], max_tokens=4, echo=True, stream=True, **GREEDY
    )
    streamed = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [PROMPT + texts[0], other + texts[1]]


def test_output_budgets(client: OpenAI) -> None:
    long = {"ignore_eos": True}
    default = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=long)
    assert default.usage is not None and default.usage.completion_tokens == 16  # OpenAI's default
    assert default.choices[0].finish_reason == "length"
    body = {"model": MODEL, "prompt": PROMPT, "max_completion_tokens": 5, **long}
    short = client.completions.create(model=MODEL, prompt=PROMPT, extra_body=body)
    assert short.usage is not None and short.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=3, extra_body=long
    )  # type: ignore[arg-type]
    assert chat.usage is not None and chat.usage.completion_tokens == 3


def test_continuous_usage_stats(client: OpenAI) -> None:
    for create, kw in (
        (client.completions.create, {"prompt": PROMPT}),
        (client.chat.completions.create, {"messages": CHAT}),
    ):
        stream = create(  # type: ignore[operator]
            model=MODEL,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
            **kw,
        )
        chunks = list(stream)
        assert all(c.usage is not None for c in chunks), chunks
        done = [c.usage.completion_tokens for c in chunks]
        assert done == sorted(done) and done[-1] == 8 and chunks[-1].choices == []
        assert len({c.usage.prompt_tokens for c in chunks}) == 1


def test_tokenize_and_detokenize(
    server: ServerProcess, http: httpx.Client, client: OpenAI, tokenizer: Any
) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"]) and body["max_model_len"] > 0
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
    r = http.post("/tokenize", json={"messages": CHAT})  # model is optional
    assert chat.usage is not None and r.json()["count"] == chat.usage.prompt_tokens
    r = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.json() == {"prompt": PROMPT}
    bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"model": "gpt-4o", "prompt": "x"}).status_code == 404
    assert http.post("/tokenize", json={"prompt": "x", "messages": CHAT}).status_code == 400
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401  # the API key


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "functions", [{"name": "f"}]),
        ("/v1/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "prompt_logprobs", 1),
        ("/v1/completions", "use_beam_search", True),
        ("/v1/completions", "suffix", "x"),
        ("/v1/completions", "include_stop_str_in_output", True),
    ],
)
def test_unsupported_fields_are_refused_by_name(
    http: httpx.Client, path: str, field: str, value: Any
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 1, field: value}
    body.update({"messages": CHAT} if "chat" in path else {"prompt": PROMPT})
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


# ---- items 1 and 2: reasoning and tool calls, forced through `resume` ------------------------------------


def forced(tokenizer: Any, text: str, stream: bool = False) -> dict[str, Any]:
    """extra_body: the answer goes on from `text`'s tokens as if the model had written them."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    resume = {"output_token_ids": ids, "text_chars_sent": 0, "completion_id": "chatcmpl-forced", "created": 1}
    return {"resume": resume}


def stop_now(tokenizer: Any) -> dict[str, Any]:
    return {str(tokenizer.convert_tokens_to_ids("<|im_end|>")): 100}


REASONED = "<think>\nThe user wants a greeting.\n</think>\n\nHello"
CALLS = (
    'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    "</tool_call>"
)


def gathered(stream: Any) -> tuple[str, str]:
    """A streamed chat answer's reasoning_content and content."""
    reasoning, content = "", ""
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    return reasoning, content


def test_reasoning_content_streamed_and_whole(client: OpenAI, tokenizer: Any) -> None:
    whole = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        extra_body=forced(tokenizer, REASONED),
        **GREEDY,  # type: ignore[arg-type]
    )
    message = whole.choices[0].message
    assert message.reasoning_content == "\nThe user wants a greeting.\n"  # type: ignore[attr-defined]
    assert message.content and message.content.startswith("Hello") and "think>" not in message.content
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        stream=True,
        extra_body=forced(tokenizer, REASONED),
        **GREEDY,  # type: ignore[arg-type]
    )
    reasoning, content = gathered(stream)
    assert (reasoning, content) == (message.reasoning_content, message.content)  # type: ignore[attr-defined]
    sent = REASONED.index("greeting")  # resumed mid-reasoning: the parsers know where the client is
    body = forced(tokenizer, REASONED)
    body["resume"]["text_chars_sent"] = sent
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=40,
        stream=True,
        extra_body=body,
        **GREEDY,  # type: ignore[arg-type]
    )
    reasoning, content = gathered(stream)
    assert (reasoning, content) == ("greeting.\n", message.content)
    off = client.chat.completions.create(  # no think tag: all content, whatever chat_template_kwargs say
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert getattr(off.choices[0].message, "reasoning_content", None) is None


def test_tool_calls_streamed_and_whole(client: OpenAI, tokenizer: Any) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": CHAT, "tools": [WEATHER_TOOL], "max_tokens": 80}
    kw["logit_bias"] = stop_now(tokenizer)
    whole = client.chat.completions.create(**kw, extra_body=forced(tokenizer, CALLS))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_weather", {"city": "Oslo", "unit": "celsius"}),
    ]
    assert len({c.id for c in calls}) == 2
    with client.chat.completions.stream(**kw, extra_body=forced(tokenizer, CALLS)) as stream:
        final = stream.get_final_completion()  # the SDK assembles the tool_calls deltas
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls" and streamed.message.content == "Checking."
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [  # type: ignore[union-attr]
        (c.function.name, c.function.arguments)
        for c in calls  # type: ignore[union-attr]
    ]


def test_tool_history_goes_through_the_chat_template(
    client: OpenAI, http: httpx.Client, tokenizer: Any
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees and sunny"},
    ]
    r = http.post("/tokenize", json={"messages": messages, "tools": [WEATHER_TOOL]})
    assert r.status_code == 200, r.text
    prompt = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "22 degrees and sunny" in prompt
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=4)  # type: ignore[arg-type, list-item]
    assert out.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=40,  # type: ignore[list-item]
        logit_bias=stop_now(tokenizer),
        extra_body=forced(tokenizer, CALLS),
    )
    assert not none.choices[0].message.tool_calls and "<tool_call>" in (none.choices[0].message.content or "")


def test_required_and_named_tool_choice_match_the_schema(client: OpenAI) -> None:
    pytest.importorskip("pdserve.structured")  # grammar27's constraint engine
    schema = WEATHER_TOOL["function"]["parameters"]  # type: ignore[index]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        kw: dict[str, Any] = {"model": MODEL, "messages": CHAT, "tools": [WEATHER_TOOL], "max_tokens": 200}
        kw.update(tool_choice=tool_choice, temperature=0.8, seed=3, parallel_tool_calls=False)
        whole = client.chat.completions.create(**kw).choices[0].message
        with client.chat.completions.stream(**kw) as stream:
            deltas = [
                d
                for e in stream
                if e.type == "chunk"
                for c in e.chunk.choices
                for d in c.delta.tool_calls or []
            ]
            streamed = stream.get_final_completion().choices[0].message
        # vLLM's deltas: the call's index, id, type and name first; then its arguments, piece by piece
        first = deltas[0]
        assert (
            first.id and first.type == "function" and first.function and first.function.name == "get_weather"
        )
        assert len(deltas) > 3 and all(d.index == 0 and d.id is None for d in deltas[1:]), deltas
        for message in (whole, streamed):
            calls = message.tool_calls or []
            assert calls and all(c.function.name == "get_weather" for c in calls), message  # type: ignore[union-attr]
            for c in calls:
                jsonschema.validate(json.loads(c.function.arguments), schema)  # type: ignore[union-attr]
        as_called = [
            [(c.function.name, c.function.arguments) for c in m.tool_calls or []] for m in (whole, streamed)
        ]  # type: ignore[union-attr]
        assert as_called[0] == as_called[1]  # the same seeded draw, streamed and assembled by the SDK


def test_forced_tool_call_after_reasoning(client: OpenAI, tokenizer: Any) -> None:
    """The server's reasoning parser (qwen3) lets a forced call follow the model's reasoning: an answer
    that has thought (resumed from a recorded think block) goes on into the call, whose reasoning
    is reasoning_content, streamed and not."""
    pytest.importorskip("pdserve.structured")
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo"]},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
    kw: dict[str, Any] = {"model": MODEL, "messages": CHAT, "tools": [tool], "max_tokens": 80, **GREEDY}
    kw["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
    thought = "<think>\nThe user wants the weather.\n</think>\n\n"
    whole = client.chat.completions.create(**kw, extra_body=forced(tokenizer, thought)).choices[0]
    with client.chat.completions.stream(**kw, extra_body=forced(tokenizer, thought)) as stream:
        streamed = stream.get_final_completion().choices[0]
    for choice in (whole, streamed):
        message = choice.message
        assert message.reasoning_content == "\nThe user wants the weather.\n", message  # type: ignore[attr-defined]
        calls = message.tool_calls or []
        assert len(calls) == 1 and calls[0].function.name == "get_weather", message  # type: ignore[union-attr]
        jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])  # type: ignore[union-attr, index]
    assert whole.message.tool_calls[0].function.arguments == streamed.message.tool_calls[0].function.arguments  # type: ignore[index, union-attr]


def test_a_non_streamed_resume_refuses_logprobs(http: httpx.Client, tokenizer: Any) -> None:
    """A non-streamed answer that resumes repeats the resumed tokens, whose logprobs this instance does
    not have: a 400 naming logprobs, rather than logprobs for the new tokens only. A resumed stream
    sends only new tokens, with their logprobs."""
    resume = forced(tokenizer, " Paris, and")
    bodies = [
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 1}),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}),
    ]
    for path, body in bodies:
        resumed = len(resume["resume"]["output_token_ids"])  # they count against max_tokens
        body |= {"model": MODEL, "max_tokens": resumed + 3, **resume, **GREEDY}
        body["ignore_eos"] = True
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
        with http.stream("POST", path, json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        logprobs = [
            c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
        ]
        count = sum(len(lp["content"] if "content" in lp else lp["tokens"]) for lp in logprobs)
        assert count == 3, chunks  # the new tokens'

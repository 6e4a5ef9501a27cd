"""A request's omitted sampling fields take the model's generation_config.json values
(server/sampling_defaults.py): a real server on a copy of the default model whose file asks for
greedy decoding with a repetition penalty (tests/conftest.py: small_server, TUNED)."""

from __future__ import annotations

from typing import Any

from openai import OpenAI

from tests.conftest import MODEL, TUNED, ServerProcess

PROMPT = "The capital of France is"


def _text(server: ServerProcess, **params: Any) -> str:
    client = OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=300)
    extra = {k: params.pop(k) for k in ("repetition_penalty", "ignore_eos") if k in params}
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, extra_body=extra, **params)
    return str(out.choices[0].text)


def test_omitted_fields_take_the_models_values(small_server: ServerProcess) -> None:
    omitted = _text(small_server, ignore_eos=True)
    explicit = {"temperature": TUNED["temperature"], "repetition_penalty": TUNED["repetition_penalty"]}
    assert omitted == _text(small_server, ignore_eos=True, **explicit)
    assert omitted == _text(small_server, ignore_eos=True)  # greedy: every time the same
    # the request's own value wins: without the penalty greedy decoding says something else
    assert omitted != _text(small_server, ignore_eos=True, temperature=0.0, repetition_penalty=1.0)
    assert "sampling defaults from" in small_server.log_path.read_text(errors="replace")
    assert small_server.wait_pool_free()["pool_free"]

"""A request's omitted sampling fields take the model's generation_config.json values
(server/sampling_defaults.py): a real server on a copy of the default model whose file asks for
greedy decoding with a repetition penalty."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import MODEL, ServerProcess, running_server

PROMPT = "The capital of France is"
TUNED = {"temperature": 0.0, "repetition_penalty": 1.3, "do_sample": True}


@pytest.fixture(scope="module")
def tuned_server(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tuned = tmp_path_factory.mktemp("tuned") / "model"
    tuned.mkdir()
    for name in os.listdir(model_dir):
        if name != "generation_config.json":
            (tuned / name).symlink_to(Path(model_dir) / name)
    config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    (tuned / "generation_config.json").write_text(json.dumps({**config, **TUNED}))
    log = tmp_path_factory.mktemp("tuned-log") / "server.log"
    args = ["--model", str(tuned), "--served-model-name", MODEL, "--num-blocks", "128", "--device", "cpu"]
    with running_server(log, args) as server:
        yield server


def _text(server: ServerProcess, **params: Any) -> str:
    client = OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=300)
    extra = {k: params.pop(k) for k in ("repetition_penalty", "ignore_eos") if k in params}
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, extra_body=extra, **params)
    return str(out.choices[0].text)


def test_omitted_fields_take_the_models_values(tuned_server: ServerProcess) -> None:
    omitted = _text(tuned_server, ignore_eos=True)
    assert omitted == _text(tuned_server, ignore_eos=True, temperature=0.0, repetition_penalty=1.3)
    assert omitted == _text(tuned_server, ignore_eos=True)  # greedy: every time the same
    # the request's own value wins: without the penalty greedy decoding says something else
    assert omitted != _text(tuned_server, ignore_eos=True, temperature=0.0, repetition_penalty=1.0)
    assert "sampling defaults from" in tuned_server.log()
    assert tuned_server.wait_pool_free()["pool_free"]

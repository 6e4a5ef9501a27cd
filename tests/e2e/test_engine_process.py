"""`pdserve serve --engine-process`: the engine core in its own process behaves as the engine thread does.

One instance of the default model with its engine in a child process (CPU) and three prompt threads
(--prompt-threads: each tokenizes with its own copy of the tokenizer):
- concurrent chat, completion and /tokenize requests give what the session's `server` (one prompt
  thread) gives them one at a time;
- chat and completion streams through the openai SDK equal, chunk for chunk, those of the session's
  `server` (the engine on a thread, unless PDSERVE_ENGINE_PROCESS=1 runs the whole suite in process mode);
- a client that leaves mid-stream has its request aborted in the core (/metrics: nothing running, the
  KV pool free, long before the request could have finished by itself);
- the core SIGKILLed: the open stream ends with an engine_dead error event and [DONE], and the server
  exits with EngineDeadError.EXIT_STATUS (for its supervisor to restart it);
- a core whose Engine cannot be built raises in start() what the engine thread raises.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.core_client import CoreClient
from pdserve.errors import EngineDeadError
from pdserve.options import engine_config
from tests.conftest import API_KEY, ServerProcess
from tests.e2e.cluster import MODEL, Instance, wait_until
from tests.e2e.test_engine_survives import _workers

PROMPTS = ["The capital of France is"]
LONG = {"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def core_server(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    log_dir = tmp_path_factory.mktemp("engine-process")
    inst = Instance(
        "core",
        "both",
        model_dir,
        log_dir,
        extra=["--engine-process", "--max-num-seqs", "16", "--prompt-threads", "3"],
    )
    inst.start()
    try:
        inst.wait_ready()
        yield inst
    finally:
        inst.stop()


def _streamed(client: OpenAI, prompt: str) -> tuple[list[str], list[str]]:
    """The text chunks of a greedy chat stream and of a greedy completion stream of `prompt`."""
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0.0,
        stream=True,
    )
    chat_chunks = [c.choices[0].delta.content or "" for c in chat if c.choices]
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.0, stream=True)
    return chat_chunks, [c.choices[0].text for c in text if c.choices]


def test_streams_equal_the_engine_threads(server: ServerProcess, core_server: Instance) -> None:
    thread = OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)
    process = OpenAI(base_url=f"{core_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    for prompt in PROMPTS:
        expected = _streamed(thread, prompt)
        assert all(len(chunks) > 5 for chunks in expected)
        assert _streamed(process, prompt) == expected


def _answers(client: OpenAI, url: str, headers: dict[str, str], i: int) -> tuple[str, str, list[int]]:
    """A greedy chat answer, a greedy completion and the /tokenize ids of the i-th of several prompts."""
    prompt = f"List {i + 2} colours of the rainbow, then count to {i + 5}: " + "one two three " * (i + 1)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0.0
    )
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.0)
    ids = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}, headers=headers).json()
    return chat.choices[0].message.content or "", text.choices[0].text, ids["tokens"]


def test_prompt_threads_answer_as_one_does(server: ServerProcess, core_server: Instance) -> None:
    thread = OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)
    process = OpenAI(base_url=f"{core_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    expected = [_answers(thread, server.url, server.headers, i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: _answers(process, core_server.url, {}, i), range(6)))
    assert got == expected
    assert all(len(ids) > 10 for _, _, ids in got)


def test_a_client_that_leaves_aborts_its_request_in_the_core(core_server: Instance) -> None:
    with httpx.stream("POST", f"{core_server.url}/v1/completions", json=LONG, timeout=60) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the connection before we mean to
        assert next(line for line in lines if line.startswith("data: {"))  # it is being answered
        assert core_server.metric("pdserve_num_requests_running") == 1
    # 4000 tokens take minutes on CPU: only an abort frees the engine this soon
    assert wait_until(lambda: core_server.metric("pdserve_num_requests_running") == 0, 20)
    assert core_server.wait_pool_free()["pool_free"]


def test_a_killed_core_ends_open_streams_and_the_server(core_server: Instance) -> None:
    proc = core_server.proc
    assert proc is not None and proc.popen is not None
    (core,) = _workers(proc.pid)
    events: list[str] = []
    with httpx.stream("POST", f"{core_server.url}/v1/completions", json=LONG, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
            if len(events) == 2:
                os.kill(core, signal.SIGKILL)
    started = time.monotonic()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_dead" and "exited" in error["message"], error
    assert proc.popen.wait(30) == EngineDeadError.EXIT_STATUS, proc.log()
    assert time.monotonic() - started < 30
    assert not Path(f"/proc/{core}").exists()


def test_a_core_that_cannot_start_raises_what_the_engine_thread_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    config = engine_config(model=str(tmp_path), device="cpu")
    raised = []
    for engine in (AsyncEngine(config), CoreClient(config)):
        with pytest.raises(Exception) as error:  # noqa: PT011 - whatever it is, both must raise it
            engine.start(timeout=120)
        raised.append((type(error.value), str(error.value)))
    assert raised[0] == raised[1]

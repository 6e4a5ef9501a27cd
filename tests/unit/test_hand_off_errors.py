"""How a request that ended in the engine with an error reaches the client: a hand-off the prefill
refused as wrong is the client's 400 (no retry helps), one it could not deliver a 502 the router
retries, anything else a 500; with the engine dead, 503."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.engine.outputs import RequestOutput
from pdserve.errors import EngineDeadError, InvalidRequestError, PrefillDrainingError, PrefillFailedError
from pdserve.server.streaming import GenerationRunner


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        ("invalid_request: the prefill instance: prompt has 40 tokens", InvalidRequestError, "prompt has 40"),
        ("prefill_failed: prefill instance tcp://h:1 stopped answering", PrefillFailedError, "stopped"),
        ("prefill_draining: draining", PrefillDrainingError, "draining"),
        ("something else broke", RuntimeError, "something else"),
    ],
)
def test_engine_errors_map_to_their_kind(error: str, kind: type, message: str) -> None:
    runner = GenerationRunner(SimpleNamespace(fatal_error=None, tokenizer=None))  # type: ignore[arg-type]
    out = RequestOutput("r", [], "", finished=True, finish_reason="error", error=error)
    found = runner.failure(out)
    assert type(found) is kind and message in str(found)


def test_a_dead_engine_is_unavailable() -> None:
    runner = GenerationRunner(SimpleNamespace(fatal_error="CUDA error", tokenizer=None))  # type: ignore[arg-type]
    out = RequestOutput("r", [], "", finished=True, finish_reason="error", error="invalid_request: x")
    assert isinstance(runner.failure(out), EngineDeadError)

"""Outputs built while the next step runs (SchedulerConfig.overlap_outputs, forced on: by default only
CUDA overlaps, where a launch returns before the step ends): the same tokens, text and
finish reasons as an engine that waits for each step, stop strings that hit after the next step was
launched drop that step's token, aborts of a request in flight free everything, and the overlap
really happens (detokenizing runs while a step is in flight)."""

from __future__ import annotations

import time

import pytest

from pdserve.engine import engine as engine_module
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.llm import LLM
from pdserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(model_dir: str) -> tuple[LLM, LLM]:
    return (
        LLM(model_dir, num_blocks=256, enable_prefix_caching=False, overlap_outputs=True),  # on CPU too
        LLM(model_dir, num_blocks=256, enable_prefix_caching=False, overlap_outputs=False),
    )


def test_detokenizing_runs_while_the_next_step_is_in_flight(
    engines: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch, prompt_ids: list[list[int]]
) -> None:
    seen: dict[str, list[bool]] = {"on": [], "off": []}
    real = Detokenizer.add_token
    for name, llm in zip(("on", "off"), engines, strict=True):
        engine = llm.engines[0]

        def add_token(  # type: ignore[no-untyped-def]
            self: Detokenizer, token_id: int, check_stop: bool = True, engine=engine, name=name
        ) -> bool:
            seen[name].append(engine.in_flight is not None)
            return real(self, token_id, check_stop)

        monkeypatch.setattr(Detokenizer, "add_token", add_token)
        llm.generate_ids(prompt_ids[:3], GREEDY)
    assert len(seen["on"]) == len(seen["off"]) == 60
    assert sum(seen["on"]) >= 57  # all but the last step's tokens (and nothing left to launch then)
    assert not any(seen["off"])


def test_stop_strings_give_what_a_waiting_engine_gives(
    engines: tuple[LLM, LLM], prompt_ids: list[list[int]]
) -> None:
    overlapped, waiting = engines
    free = waiting.generate_ids(prompt_ids[:6], GREEDY)
    stops = [c.text[len(c.text) // 2 : len(c.text) // 2 + 3] for c in free]  # hit mid-way through
    for ids, stop, whole in zip(prompt_ids[:6], stops, free, strict=True):
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop])
        a, b = overlapped.generate_ids([ids], params)[0], waiting.generate_ids([ids], params)[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert a.finish_reason == "stop" and stop not in a.text and whole.text.startswith(a.text)
        assert a.token_ids == whole.token_ids[: len(a.token_ids)] and len(a.token_ids) < 20
    for llm in engines:
        assert llm.engines[0].check_pool_free()


def test_batched_stop_strings_and_lengths_leave_the_pool_free(
    engines: tuple[LLM, LLM], prompt_ids: list[list[int]]
) -> None:
    overlapped, waiting = engines
    params = SamplingParams(temperature=0.0, max_tokens=12, stop=[" the", "\n"])
    a = overlapped.generate_ids(prompt_ids, params)
    b = waiting.generate_ids(prompt_ids, params)
    assert [(c.token_ids, c.text, c.finish_reason) for c in a] == [
        (c.token_ids, c.text, c.finish_reason) for c in b
    ]
    assert overlapped.engines[0].check_pool_free()


def test_the_default_overlaps_on_cuda_only(model_dir: str) -> None:
    assert not LLM(model_dir, num_blocks=64).engines[0].overlap  # CPU: a launch is the whole step


def test_an_abort_while_its_step_is_in_flight(engines: tuple[LLM, LLM], prompt_ids: list[list[int]]) -> None:
    engine = engines[0].engines[0]
    engine.add_request("keep", prompt_ids[0], GREEDY)
    engine.add_request("drop", prompt_ids[1], GREEDY)
    outputs = []
    while engine.in_flight is None or len(outputs) < 6:
        outputs += engine.step()
    assert any(c.request.request_id == "drop" for c in engine.in_flight.sched.chunks)
    engine.abort_request("drop")
    while engine.has_unfinished():
        outputs += engine.step()
    drop = [o for o in outputs if o.request_id == "drop"]
    assert drop[-1].finished and drop[-1].finish_reason == "abort" and not drop[-1].new_token_ids
    assert sum(o.finished for o in drop) == 1  # the in-flight token never shows up after the abort
    keep = [t for o in outputs if o.request_id == "keep" for t in o.new_token_ids]
    assert len(keep) == 20
    assert engine.check_pool_free()


def _count_ahead(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = engine_module.schedule_ahead
    monkeypatch.setattr(
        engine_module, "schedule_ahead", lambda flight, sched: calls.append(1) or real(flight, sched)
    )
    return calls


def test_steady_decodes_launch_ahead_and_match(
    engines: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch, prompt_ids: list[list[int]]
) -> None:
    calls = _count_ahead(monkeypatch)
    before = engines[0].engines[0].stats()
    params = SamplingParams(temperature=0.0, max_tokens=16)  # EOS on: some end inside an ahead step
    t0 = time.perf_counter()
    a = engines[0].generate_ids(prompt_ids, params)
    wall = time.perf_counter() - t0
    after = engines[0].engines[0].stats()
    assert len(calls) >= 10  # most decode steps of the batch went ahead
    assert after.num_steps_ahead - before.num_steps_ahead == len(calls)  # /metrics' gauge
    # StepClock: every collected step's device time counted once (on the CPU a launch computes it)
    busy = after.device_busy_seconds - before.device_busy_seconds
    assert 0.3 * wall < busy <= wall, (busy, wall)
    assert 0 <= after.host_wait_seconds - before.host_wait_seconds <= wall
    b = engines[1].generate_ids(prompt_ids, params)
    assert [(c.token_ids, c.text, c.finish_reason) for c in a] == [
        (c.token_ids, c.text, c.finish_reason) for c in b
    ]
    assert engines[0].engines[0].check_pool_free()


def test_top_k_top_p_rows_launch_ahead_too(
    engines: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch, prompt_ids: list[list[int]]
) -> None:
    """Truncation needs nothing from the host (the one-launch sampler does it on CUDA): ahead."""
    calls = _count_ahead(monkeypatch)
    params = SamplingParams(temperature=0.0, top_k=20, top_p=0.9, min_p=0.05, max_tokens=12)
    a = engines[0].generate_ids(prompt_ids[:4], params)
    assert calls
    b = engines[1].generate_ids(prompt_ids[:4], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=14),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5, max_tokens=14),
        SamplingParams(temperature=0.0, min_tokens=6, stop_token_ids=[198], max_tokens=14),
    ],  # 198 (a newline) comes within 6 tokens for several prompts: banned until the 7th
    ids=["repetition", "presence+frequency", "min_tokens"],
)
def test_penalized_rows_launch_ahead_and_match(
    engines: tuple[LLM, LLM],
    monkeypatch: pytest.MonkeyPatch,
    prompt_ids: list[list[int]],
    params: SamplingParams,
) -> None:
    """Penalties and min_tokens bans count the previous step's tokens on the device
    (engine/penalties.py): the same tokens as an engine that waits for each step, and the penalty
    really acts (the tokens differ from plain greedy). Where min_tokens is reached exactly by the
    unseen token is pinned by tests/unit/test_penalties.py (greedy here rarely lands on it)."""
    calls = _count_ahead(monkeypatch)
    a = engines[0].generate_ids(prompt_ids, params)
    assert len(calls) >= 8
    b = engines[1].generate_ids(prompt_ids, params)
    assert [(c.token_ids, c.finish_reason) for c in a] == [(c.token_ids, c.finish_reason) for c in b]
    unpenalized = SamplingParams(temperature=0.0, stop_token_ids=params.stop_token_ids, max_tokens=14)
    plain = engines[1].generate_ids(prompt_ids, unpenalized)
    assert [c.token_ids for c in a] != [c.token_ids for c in plain]
    assert engines[0].engines[0].check_pool_free()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, seed=5, max_tokens=8),  # a seeded draw: the torch sampler
        SamplingParams(temperature=0.0, logprobs=2, max_tokens=8),
        SamplingParams(temperature=0.0, max_tokens=1),  # the token is the last: nothing to go ahead of
    ],
    ids=["seed", "logprobs", "max_tokens=1"],
)
def test_no_step_goes_ahead_where_the_token_is_needed_first(
    engines: tuple[LLM, LLM],
    monkeypatch: pytest.MonkeyPatch,
    prompt_ids: list[list[int]],
    params: SamplingParams,
) -> None:
    calls = _count_ahead(monkeypatch)
    a = engines[0].generate_ids(prompt_ids[:4], params)
    assert not calls
    b = engines[1].generate_ids(prompt_ids[:4], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_ahead_stops_at_the_length_limit(
    engines: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch, prompt_ids: list[list[int]]
) -> None:
    calls = _count_ahead(monkeypatch)
    out = engines[0].generate_ids(prompt_ids[:3], GREEDY)
    assert [len(c.token_ids) for c in out] == [20, 20, 20] and calls  # no 21st token from a step ahead


def test_the_serving_loop_with_overlap_streams_the_same_tokens_and_aborts_cleanly(
    model_dir: str, engines: tuple[LLM, LLM], prompt_ids: list[list[int]]
) -> None:
    """AsyncEngine (the server's loop thread) with overlap and steps ahead forced on: commands (adds,
    aborts) arrive between steps while a step is in flight."""
    import asyncio

    from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pdserve.engine.async_engine import AsyncEngine

    params = SamplingParams(temperature=0.0, max_tokens=16, stop=["\n\n"])
    want = [c.token_ids for c in engines[1].generate_ids(prompt_ids[:5], params)]
    config = EngineConfig(
        model=ModelConfig(path=model_dir),
        cache=CacheConfig(num_blocks=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(overlap_outputs=True),
    )
    engine = AsyncEngine(config)
    engine.start(timeout=120)

    async def tokens(i: int, ids: list[int]) -> list[int]:
        return [t async for out in engine.generate(ids, params, f"q{i}") for t in out.new_token_ids]

    async def abandoned() -> int:
        got = 0
        async for out in engine.generate(prompt_ids[5], GREEDY, "gone"):
            got += len(out.new_token_ids)
            if got >= 3:
                break  # the generator's close aborts it while its next step is in flight
        return got

    async def run() -> tuple[list[list[int]], int]:
        *got, left = await asyncio.gather(
            *(tokens(i, ids) for i, ids in enumerate(prompt_ids[:5])), abandoned()
        )
        return got, left

    try:
        got, left = asyncio.run(asyncio.wait_for(run(), 120))
        assert got == want and left == 3
        assert asyncio.run(asyncio.wait_for(engine.check_pool_free(), 30))
        assert engine._engine.overlap and engine.is_healthy()
    finally:
        engine.shutdown()


def test_stop_strings_count_from_min_tokens_on(engines: tuple[LLM, LLM], prompt_ids: list[list[int]]) -> None:
    """A stop string in the first tokens' text does not end a request before min_tokens (as vLLM);
    the same with and without overlap."""
    plain = engines[1].generate_ids(prompt_ids[:1], GREEDY)[0]
    stop = plain.text.strip()[:2]  # in the first tokens' text
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop])
    early = engines[1].generate_ids(prompt_ids[:1], params)[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 8
    waited = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop], min_tokens=8)
    for llm in engines:
        out = llm.generate_ids(prompt_ids[:1], waited)[0]
        assert len(out.token_ids) >= 8 and out.token_ids == plain.token_ids[: len(out.token_ids)]
        assert out.text.startswith(early.text + stop)

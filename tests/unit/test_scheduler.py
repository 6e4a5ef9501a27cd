"""Scheduler without a model: the test plays the engine loop (schedule, run, sample, finish).

A step here reads which chunks sample before `update_computed`, appends a fake token to each of those
requests, and finishes a request once it has `params.max_tokens` outputs.
"""

from __future__ import annotations

import random

import pytest

from pdserve.config import SchedulerConfig
from pdserve.disagg.handoff import FromPrefill, HandOff
from pdserve.engine.block_manager import BlockManager, cdiv
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.errors import InvalidRequestError, OverloadedError

BS = 4
FAKE_TOKEN = 7000

Chunk = tuple[str, int, int]  # (request id, start, num_tokens)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = BS,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_waiting: int = 512,
    prefix_caching: bool = True,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting
    )
    return Scheduler(config, bm)


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def tokens(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def add(sched: Scheduler, request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    request = make_request(request_id, prompt, max_tokens)
    sched.add_request(request)
    return request


def step(sched: Scheduler) -> tuple[list[Chunk], SchedulerOutput]:
    """One engine step; returns the chunks as (id, start, num_tokens) read before the update."""
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    chunks = [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]
    sampling = [c.request for c in out.chunks if c.samples]
    sched.update_computed(out)
    for request in sampling:
        request.append_token(FAKE_TOKEN + request.num_output_tokens)
        if request.num_output_tokens >= request.params.max_tokens:
            sched.finish_request(request, RequestStatus.FINISHED_LENGTH)
    return chunks, out


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[list[Chunk]]:
    history = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return history
        history.append(step(sched)[0])
    raise AssertionError(f"not finished after {max_steps} steps")


def assert_pool_free(bm: BlockManager) -> None:
    """Once every request is freed: all blocks free, unreferenced, and each in the free queue once."""
    assert bm.num_free_blocks == bm.num_blocks
    assert [b.ref_count for b in bm.blocks] == [0] * bm.num_blocks
    assert sorted(bm.free_queue) == list(range(bm.num_blocks))


def assert_done(sched: Scheduler, *requests: Request) -> None:
    assert not sched.has_unfinished
    assert sched.requests == {}
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [FAKE_TOKEN + i for i in range(r.params.max_tokens or 0)]
    assert_pool_free(sched.bm)


# --- basic flow ---------------------------------------------------------------------------------------


def test_empty_scheduler_schedules_nothing() -> None:
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty
    assert out.num_tokens == 0
    assert out.preempted == []


def test_short_prompt_prefills_in_one_step_then_decodes() -> None:
    sched = make_scheduler()
    r = add(sched, "r", tokens(0, 6), max_tokens=3)
    assert r.status == RequestStatus.WAITING
    assert step(sched)[0] == [("r", 0, 6)]
    assert r.status == RequestStatus.RUNNING
    assert r.num_output_tokens == 1
    assert step(sched)[0] == [("r", 6, 1)]
    assert step(sched)[0] == [("r", 7, 1)]
    assert_done(sched, r)


def test_chunked_prefill_splits_long_prompt_by_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    r = add(sched, "r", tokens(0, 20), max_tokens=2)
    outputs = []
    history = []
    while sched.has_unfinished:
        history.append(step(sched)[0])
        outputs.append(r.num_output_tokens)
    assert history == [[("r", 0, 8)], [("r", 8, 8)], [("r", 16, 4)], [("r", 20, 1)]]
    assert outputs == [0, 0, 1, 2]
    assert_done(sched, r)


def test_only_the_last_prefill_chunk_samples() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    r = add(sched, "r", tokens(0, 12))
    out = sched.schedule()
    assert [c.samples for c in out.chunks] == [False]
    sched.update_computed(out)
    out = sched.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(8, 4, True)]
    sched.update_computed(out)
    sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert_pool_free(sched.bm)


def test_decodes_and_prefill_chunk_share_one_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a = add(sched, "a", tokens(0, 4), max_tokens=5)
    assert step(sched)[0] == [("a", 0, 4)]
    b = add(sched, "b", tokens(100, 20), max_tokens=2)
    assert step(sched)[0] == [("a", 4, 1), ("b", 0, 7)]
    assert step(sched)[0] == [("a", 5, 1), ("b", 7, 7)]
    assert step(sched)[0] == [("a", 6, 1), ("b", 14, 6)]
    run_to_completion(sched)
    assert_done(sched, a, b)


def test_running_requests_are_scheduled_before_waiting_ones() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a = add(sched, "a", tokens(0, 20), max_tokens=1)
    b = add(sched, "b", tokens(100, 4), max_tokens=1)
    assert step(sched)[0] == [("a", 0, 8)]
    assert step(sched)[0] == [("a", 8, 8)]
    assert list(sched.waiting) == [b]
    assert step(sched)[0] == [("a", 16, 4), ("b", 0, 4)]
    assert_done(sched, a, b)


def test_budget_respected_with_many_requests() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    requests = [add(sched, f"r{i}", tokens(100 * i, 7 + i), max_tokens=3) for i in range(6)]
    history = run_to_completion(sched)
    assert [sum(n for _, _, n in chunks) for chunks in history[:3]] == [10, 10, 10]
    assert all(sum(n for _, _, n in chunks) <= 10 for chunks in history)
    assert_done(sched, *requests)


def test_max_num_seqs_caps_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=2)
    r0 = add(sched, "r0", tokens(0, 4), max_tokens=1)
    r1 = add(sched, "r1", tokens(100, 4), max_tokens=3)
    r2 = add(sched, "r2", tokens(200, 4), max_tokens=3)
    assert step(sched)[0] == [("r0", 0, 4), ("r1", 0, 4)]
    assert sched.running == [r1]
    assert list(sched.waiting) == [r2]
    assert step(sched)[0] == [("r1", 4, 1), ("r2", 0, 4)]
    assert len(sched.running) == 2
    run_to_completion(sched)
    assert_done(sched, r0, r1, r2)


def test_fcfs_request_that_does_not_fit_blocks_those_behind_it() -> None:
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    a = add(sched, "a", tokens(0, 20), max_tokens=4)
    assert step(sched)[0] == [("a", 0, 20)]
    b = add(sched, "b", tokens(100, 16), max_tokens=1)
    c = add(sched, "c", tokens(200, 4), max_tokens=1)
    assert step(sched)[0] == [("a", 20, 1)]
    assert list(sched.waiting) == [b, c]
    assert sched.bm.num_free_blocks == 2  # c alone would fit
    assert step(sched)[0] == [("a", 21, 1)]
    assert step(sched)[0] == [("a", 22, 1)]
    assert a.is_finished
    assert step(sched)[0] == [("b", 0, 16), ("c", 0, 4)]
    assert_done(sched, a, b, c)


# --- preemption ---------------------------------------------------------------------------------------


def three_requests_one_block_each(prefix_caching: bool) -> tuple[Scheduler, Request, Request, Request]:
    """A pool of 3 blocks, three 4-token prompts: step 1 fills it, step 2 must preempt."""
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=64, prefix_caching=prefix_caching)
    a = add(sched, "a", tokens(0, 4), max_tokens=3)
    b = add(sched, "b", tokens(100, 4), max_tokens=2)
    c = add(sched, "c", tokens(200, 4), max_tokens=2)
    assert step(sched)[0] == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0], [1], [2])
    assert sched.bm.num_free_blocks == 0
    return sched, a, b, c


def test_preemption_takes_the_most_recently_added_running_request() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=False)
    chunks, out = step(sched)
    # a needs a second block: c (last) is preempted; then b needs one and is itself the last.
    assert out.preempted == [c, b]
    assert chunks == [("a", 4, 1)]
    assert a.block_ids == [0, 2]
    assert sched.running == [a]
    assert sched.num_preemptions == 2
    run_to_completion(sched)
    assert_done(sched, a, b, c)


def test_preempted_request_loses_its_blocks_and_progress() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=False)
    step(sched)
    for r in (b, c):
        assert r.status == RequestStatus.PREEMPTED
        assert r.block_ids == []
        assert r.num_computed_tokens == 0
        assert r.num_preemptions == 1
        assert r.num_tokens == 5  # its sampled token is kept
    assert sched.bm.num_free_blocks == 1
    assert [blk.ref_count for blk in sched.bm.blocks] == [1, 0, 1]
    run_to_completion(sched)
    assert_done(sched, a, b, c)


def test_preempted_requests_go_to_the_front_of_waiting() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=False)
    d = add(sched, "d", tokens(300, 4), max_tokens=1)
    step(sched)
    assert list(sched.waiting) == [b, c, d]
    run_to_completion(sched)
    assert_done(sched, a, b, c, d)


def test_preempted_request_is_recomputed_from_scratch() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=False)
    step(sched)
    assert step(sched)[0] == [("a", 5, 1)]  # b needs 2 blocks for 5 tokens, 1 is free
    assert a.is_finished
    assert step(sched)[0] == [("b", 0, 5)]  # prompt + its first output, then b is done
    assert step(sched)[0] == [("c", 0, 5)]
    assert_done(sched, a, b, c)


def test_preempted_request_reuses_its_own_cached_block() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=True)
    step(sched)
    assert step(sched)[0] == [("a", 5, 1)]
    assert step(sched)[0] == [("b", 4, 1)]  # b's freed block 1 is still cached
    # c's block 2 went to a and lost its hash: c recomputes everything.
    assert step(sched)[0] == [("c", 0, 5)]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (0, 0)
    assert (sched.bm.query_tokens, sched.bm.hit_tokens) == (12, 0)
    assert_done(sched, a, b, c)


def test_no_admissions_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=2, prefix_caching=False)
    a = add(sched, "a", tokens(0, 2), max_tokens=6)
    v = add(sched, "v", tokens(100, 3), max_tokens=1)
    assert step(sched)[0] == [("a", 0, 2)]
    assert step(sched)[0] == [("a", 2, 1), ("v", 0, 1)]
    assert step(sched)[0] == [("a", 3, 1), ("v", 1, 1)]
    chunks, out = step(sched)
    assert out.preempted == [v]
    assert chunks == [("a", 4, 1)]
    # v's next chunk (1 token of budget left, 1 free block) would fit, but it waits a step.
    assert sched.bm.num_free_blocks == 1
    assert sched.bm.can_allocate(v, 1)
    assert list(sched.waiting) == [v]
    assert step(sched)[0] == [("a", 5, 1), ("v", 0, 1)]
    run_to_completion(sched)
    assert_done(sched, a, v)


def test_request_alone_in_the_pool_runs_to_its_length_limit() -> None:
    sched = make_scheduler(num_blocks=2, max_num_batched_tokens=64)
    r = add(sched, "r", tokens(0, 5), max_tokens=100)
    assert r.max_output_tokens == 3  # the pool holds 8 tokens
    r.params.max_tokens = r.max_output_tokens
    history = run_to_completion(sched)
    assert history == [[("r", 0, 5)], [("r", 5, 1)], [("r", 6, 1)]]
    assert sched.num_preemptions == 0
    assert_done(sched, r)


# --- prefix cache ---------------------------------------------------------------------------------------


def test_prefix_cache_hit_sets_num_cached_tokens_and_stats() -> None:
    sched = make_scheduler()
    a = add(sched, "a", tokens(0, 10), max_tokens=3)
    assert step(sched)[0] == [("a", 0, 10)]
    assert (sched.bm.query_tokens, sched.bm.hit_tokens) == (10, 0)
    b = add(sched, "b", tokens(0, 8) + [50, 51, 52], max_tokens=3)
    assert step(sched)[0] == [("a", 10, 1), ("b", 8, 3)]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 8
    assert (sched.bm.query_tokens, sched.bm.hit_tokens) == (21, 8)
    assert a.block_ids == [0, 1, 2]
    assert b.block_ids == [0, 1, 3]
    assert [blk.ref_count for blk in sched.bm.blocks[:4]] == [2, 2, 1, 1]
    run_to_completion(sched)
    assert_done(sched, a, b)


def test_identical_prompt_after_finish_recomputes_only_the_last_block() -> None:
    sched = make_scheduler()
    a = add(sched, "a", tokens(0, 12), max_tokens=1)
    assert step(sched)[0] == [("a", 0, 12)]
    b = add(sched, "b", tokens(0, 12), max_tokens=1)
    assert step(sched)[0] == [("b", 8, 4)]
    assert b.num_cached_tokens == 8
    assert_done(sched, a, b)


def test_prefix_caching_disabled_reports_no_hits() -> None:
    sched = make_scheduler(prefix_caching=False)
    a = add(sched, "a", tokens(0, 12), max_tokens=1)
    step(sched)
    b = add(sched, "b", tokens(0, 12), max_tokens=1)
    assert step(sched)[0] == [("b", 0, 12)]
    assert b.num_cached_tokens == 0
    assert (sched.bm.query_tokens, sched.bm.hit_tokens) == (24, 0)
    assert_done(sched, a, b)


# --- add_request ----------------------------------------------------------------------------------------


def test_add_request_rejects_prompt_that_can_never_fit() -> None:
    sched = make_scheduler(num_blocks=4)  # 16 tokens
    with pytest.raises(InvalidRequestError) as exc:
        add(sched, "big", tokens(0, 16))
    assert exc.value.param == "prompt"
    assert list(sched.waiting) == []
    assert sched.requests == {}


def test_add_request_accepts_the_largest_prompt_that_fits_and_caps_its_length() -> None:
    sched = make_scheduler(num_blocks=4)
    r = add(sched, "r", tokens(0, 15), max_tokens=10)
    assert list(sched.waiting) == [r]
    assert r.max_model_len == 16
    assert r.max_output_tokens == 1


def test_add_request_raises_overloaded_when_waiting_queue_is_full() -> None:
    sched = make_scheduler(max_waiting=2)
    a = add(sched, "a", tokens(0, 4))
    b = add(sched, "b", tokens(100, 4))
    with pytest.raises(OverloadedError):
        add(sched, "c", tokens(200, 4))
    assert list(sched.waiting) == [a, b]
    assert set(sched.requests) == {"a", "b"}


def test_waiting_queue_has_room_again_after_admission() -> None:
    sched = make_scheduler(max_waiting=2)
    a = add(sched, "a", tokens(0, 4), max_tokens=2)
    b = add(sched, "b", tokens(100, 4), max_tokens=2)
    step(sched)
    c = add(sched, "c", tokens(200, 4), max_tokens=2)
    assert list(sched.waiting) == [c]
    run_to_completion(sched)
    assert_done(sched, a, b, c)


def test_add_request_rejects_duplicate_request_id() -> None:
    sched = make_scheduler()
    a = add(sched, "same", tokens(0, 4))
    with pytest.raises(InvalidRequestError):
        add(sched, "same", tokens(100, 4))
    assert list(sched.waiting) == [a]
    assert sched.requests == {"same": a}


def test_request_id_can_be_reused_after_finish() -> None:
    sched = make_scheduler()
    a = add(sched, "same", tokens(0, 4), max_tokens=1)
    run_to_completion(sched)
    b = add(sched, "same", tokens(0, 4), max_tokens=1)
    run_to_completion(sched)
    assert_done(sched, a, b)


# --- finish_request -------------------------------------------------------------------------------------


def test_finish_waiting_request_removes_it() -> None:
    sched = make_scheduler()
    a = add(sched, "a", tokens(0, 4))
    b = add(sched, "b", tokens(100, 4))
    sched.finish_request(a, RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert list(sched.waiting) == [b]
    assert sched.requests == {"b": b}
    assert_pool_free(sched.bm)


def test_finish_running_request_frees_its_blocks() -> None:
    sched = make_scheduler(num_blocks=8)
    a = add(sched, "a", tokens(0, 10))
    step(sched)
    assert a.block_ids == [0, 1, 2]
    assert sched.bm.num_free_blocks == 5
    sched.finish_request(a, RequestStatus.FINISHED_ABORTED)
    assert a.block_ids == []
    assert sched.running == []
    assert not sched.has_unfinished
    assert_pool_free(sched.bm)


def test_finish_preempted_request_removes_it_from_waiting() -> None:
    sched, a, b, c = three_requests_one_block_each(prefix_caching=False)
    step(sched)
    sched.finish_request(c, RequestStatus.FINISHED_ABORTED)
    assert list(sched.waiting) == [b]
    assert "c" not in sched.requests
    run_to_completion(sched)
    assert_done(sched, a, b)


def test_finish_request_twice_is_a_no_op() -> None:
    sched = make_scheduler()
    a = add(sched, "a", tokens(0, 4))
    step(sched)
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    sched.finish_request(a, RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert_pool_free(sched.bm)


# --- randomized simulation ------------------------------------------------------------------------------


def check_step_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    """After schedule(), before update_computed: budget, slots, chunk bounds and block accounting."""
    bm = sched.bm
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    scheduled = [c.request for c in out.chunks]
    assert len({id(r) for r in scheduled}) == len(scheduled)
    assert all(r in sched.running for r in scheduled)
    assert not any(r in scheduled for r in out.preempted)
    for c in out.chunks:
        assert c.num_tokens >= 1
        assert c.start + c.num_tokens <= c.request.num_tokens
        assert len(c.request.block_ids) >= cdiv(c.start + c.num_tokens, bm.block_size)
    for r in sched.waiting:
        assert r.block_ids == [] and r.num_computed_tokens == 0
    held = [b for r in sched.running for b in r.block_ids]
    assert [blk.ref_count for blk in bm.blocks] == [held.count(i) for i in range(bm.num_blocks)]
    assert set(bm.free_queue) == {i for i in range(bm.num_blocks) if i not in held}


def check_cached_blocks(sched: Scheduler) -> None:
    """Every hashed block a running request holds stores that request's tokens and hash."""
    bs = sched.bm.block_size
    for r in sched.running:
        for i, block_id in enumerate(r.block_ids):
            block = sched.bm.blocks[block_id]
            if block.hash is not None:
                assert block.hash == r.block_hashes[i]
                assert block.token_ids == tuple(r.token_ids[i * bs : (i + 1) * bs])
    for h, block_id in sched.bm.cached.items():
        assert sched.bm.blocks[block_id].hash == h


def random_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    head = rng.choice(prefixes) if rng.random() < 0.5 else []
    return head + [rng.randrange(50) for _ in range(rng.randint(1, 40 - len(head)))]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_workload_runs_to_completion(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    sched = make_scheduler(
        num_blocks=20, max_num_seqs=6, max_num_batched_tokens=16, prefix_caching=prefix_caching
    )
    prefixes = [[rng.randrange(50) for _ in range(n)] for n in (8, 12, 13)]
    pending = [
        make_request(f"r{i}", random_prompt(rng, prefixes), max_tokens=rng.randint(1, 24)) for i in range(60)
    ]
    added: list[Request] = []
    for _ in range(5000):
        while pending and rng.random() < 0.4:
            added.append(pending.pop(0))
            sched.add_request(added[-1])
        if not pending and not sched.has_unfinished:
            break
        out = sched.schedule()
        check_step_invariants(sched, out)
        sampling = [c.request for c in out.chunks if c.samples]
        sched.update_computed(out)
        check_cached_blocks(sched)
        for r in sampling:
            r.append_token(FAKE_TOKEN + r.num_output_tokens)
            if r.num_output_tokens >= (r.params.max_tokens or 0):
                sched.finish_request(r, RequestStatus.FINISHED_LENGTH)
    assert len(added) == 60
    assert sched.num_preemptions > 0
    assert (sched.bm.hit_tokens > 0) == prefix_caching
    assert_done(sched, *added)


def test_random_aborts_leave_the_pool_free() -> None:
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=20, max_num_seqs=6, max_num_batched_tokens=16)
    prefixes = [[rng.randrange(50) for _ in range(n)] for n in (8, 12)]
    for i in range(40):
        sched.add_request(make_request(f"r{i}", random_prompt(rng, prefixes), max_tokens=rng.randint(1, 24)))
    for _ in range(5000):
        if not sched.has_unfinished:
            break
        live = list(sched.requests.values())
        if rng.random() < 0.1:
            sched.finish_request(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        step(sched)
    assert not sched.has_unfinished
    assert sched.requests == {}
    assert_pool_free(sched.bm)


class _RecordingConnector:
    """A connector that only answers the scheduler's questions and records what it is told."""

    def __init__(self) -> None:
        self.finished: list[str] = []

    @staticmethod
    def gets_kv_remotely(handoff: HandOff | None) -> bool:
        return isinstance(handoff, FromPrefill)

    def request_finished(self, request_id: str, handoff: HandOff | None) -> bool:
        self.finished.append(request_id)
        return False


def test_remote_kv_request_is_reserved_and_returned_not_sent() -> None:
    """schedule() only decides: a request whose KV comes from a prefill instance gets blocks for its
    whole prompt and is listed in `reserved`, for the engine to ask for its KV; no chunk runs it."""
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    connector = _RecordingConnector()
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), bm, connector)  # type: ignore[arg-type]
    source = FromPrefill("tcp://127.0.0.1:5601")
    remote = Request("d", tokens(1, 9), SamplingParams(max_tokens=4), handoff=source)
    local = make_request("l", tokens(100, 5))
    sched.add_request(remote)
    sched.add_request(local)
    out = sched.schedule()
    assert out.reserved == [remote] and [c.request for c in out.chunks] == [local]
    assert remote.status is RequestStatus.WAITING_FOR_KV and len(remote.block_ids) == cdiv(9, BS)
    assert remote.handoff is source  # the hand-off is never changed in place
    assert sched.schedule().reserved == []
    sched.activate(remote)
    assert remote.handoff is None and remote.num_computed_tokens == 9
    sched.finish_request(remote, RequestStatus.FINISHED_ABORTED)
    assert connector.finished == ["d"]


# --- decode-side prefix reuse: a remote-KV request reserves only the blocks it lacks -------------------


def _remote_scheduler(num_blocks: int = 16) -> Scheduler:
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32)
    return Scheduler(config, bm, _RecordingConnector())  # type: ignore[arg-type]


def _remote(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=4), handoff=FromPrefill("tcp://127.0.0.1:1"))


def _turn_one(sched: Scheduler, prompt: list[int]) -> list[int]:
    """A local request runs to its end: its full blocks stay cached. Returns its tokens and blocks' ids."""
    first = add(sched, "turn1", prompt, max_tokens=4)
    blocks: list[int] = []
    while sched.has_unfinished:
        blocks = list(first.block_ids) or blocks
        step(sched)
    return blocks


def test_remote_kv_request_reserves_only_the_blocks_after_its_cached_prefix() -> None:
    """Turn 2 extends turn 1: its leading full blocks cached here are taken as hits (computed tokens),
    only the rest are reserved; once its KV lands, the received full blocks are cached too."""
    sched = _remote_scheduler()
    turn1 = tokens(1, 13)  # 13 prompt + 4 output tokens: 4 full blocks of 4 cached afterwards
    held = _turn_one(sched, turn1)
    prompt = turn1 + [FAKE_TOKEN + i for i in range(3)] + tokens(300, 6)  # 22 tokens, 6 blocks
    remote = _remote("d", prompt)
    sched.add_request(remote)
    out = sched.schedule()
    assert out.reserved == [remote] and remote.status is RequestStatus.WAITING_FOR_KV
    assert remote.num_computed_tokens == 16 and remote.block_ids[:4] == held[:4]
    assert len(remote.block_ids) == cdiv(22, BS) and sched.num_kv_reused_tokens == 16
    sched.activate(remote)
    assert remote.num_computed_tokens == 22
    again = _remote("e", prompt + [9])
    sched.add_request(again)
    sched.schedule()
    assert again.block_ids[:5] == remote.block_ids[:5], "a block that landed was not cached"
    assert again.num_computed_tokens == 20 and sched.num_kv_reused_tokens == 36
    for r in (remote, again):
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert_pool_free(sched.bm)


@pytest.mark.parametrize(("length", "cached"), [(12, 8), (13, 12), (16, 12)])
def test_a_fully_cached_prompt_still_receives_its_last_block(length: int, cached: int) -> None:
    """Every block of the prompt is cached (16 tokens of turn 1 are): at least one token, so one block,
    still comes from the prefill instance, with the first token sampled there."""
    sched = _remote_scheduler()
    turn1 = tokens(1, 13)
    _turn_one(sched, turn1)
    remote = _remote("d", (turn1 + [FAKE_TOKEN + i for i in range(3)])[:length])
    sched.add_request(remote)
    assert sched.schedule().reserved == [remote]
    assert remote.num_computed_tokens == cached
    assert len(remote.block_ids) - cached // BS == 1
    sched.finish_request(remote, RequestStatus.FINISHED_ABORTED)
    assert_pool_free(sched.bm)


def test_cached_prefix_blocks_are_held_while_the_rest_is_awaited() -> None:
    """Between the lookup and the KV landing, the hits are referenced: a request that needs the whole
    rest of the pool cannot evict them, and an abort gives them back still cached."""
    sched = _remote_scheduler(num_blocks=10)
    turn1 = tokens(1, 9)  # 9 + 4 tokens: 3 full blocks cached
    _turn_one(sched, turn1)
    remote = _remote("d", turn1 + tokens(400, 2))  # 11 tokens: 2 hits (8 tokens), 1 block reserved
    sched.add_request(remote)
    sched.schedule()
    hits = remote.block_ids[:2]
    assert remote.num_computed_tokens == 8 and len(remote.block_ids) == 3
    hog = add(sched, "hog", tokens(1000, 27), max_tokens=1)  # 7 blocks: every other block of the pool
    assert sched.schedule().chunks[0].request is hog and sched.bm.num_free_blocks == 0
    assert all(sched.bm.blocks[b].ref_count == 1 and sched.bm.blocks[b].hash for b in hits)
    sched.finish_request(remote, RequestStatus.FINISHED_ABORTED)
    sched.finish_request(hog, RequestStatus.FINISHED_ABORTED)
    assert_pool_free(sched.bm)
    assert sched.bm.get_computed_blocks(_remote("x", turn1 + [5]))[:2] == hits, "the hits were evicted"


# --- n > 1 disaggregated: the other choices wait for the first choice's KV and share it ---------------------


def test_local_requests_with_a_remote_requests_tokens_wait_for_its_kv_then_share_it() -> None:
    """Choices 1 and 2 (local, same prompt) are held while choice 0's KV is on its way, then queue
    first, take its full blocks from the prefix cache and compute only the tail; a third request with
    other tokens is not held."""
    sched = _remote_scheduler(num_blocks=32)
    prompt = tokens(1, 10)  # 2 full blocks and 2 tokens
    leader = _remote("r-0", prompt)
    sched.add_request(leader)
    followers = [add(sched, f"r-{i}", prompt) for i in (1, 2)]
    other = add(sched, "x", tokens(500, 10))
    chunks, out = step(sched)
    assert out.reserved == [leader] and chunks == [("x", 0, 10)]
    assert step(sched)[0] == [("x", 10, 1)]  # the others are held still
    assert all(f.status is RequestStatus.WAITING and f not in sched.waiting for f in followers)
    sched.activate(leader)
    assert list(sched.waiting)[:2] == followers
    out = sched.schedule()
    shared = {c.request.request_id: (c.start, c.num_tokens) for c in out.chunks}
    assert shared["r-1"] == shared["r-2"] == (8, 2), shared  # 2 blocks from the cache, 2 tokens each
    assert all(f.block_ids[:2] == leader.block_ids[:2] for f in followers)
    assert all(f.num_cached_tokens == 8 for f in followers)
    for r in (leader, *followers, other):
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished and sched.sharing == {}
    assert_pool_free(sched.bm)


def test_held_requests_are_released_when_the_remote_request_ends_without_kv() -> None:
    """The first choice fails before its KV arrives: the others are no longer held (they compute the
    prompt here); one aborted while held simply leaves."""
    sched = _remote_scheduler(num_blocks=32)
    prompt = tokens(1, 10)
    leader = _remote("r-0", prompt)
    sched.add_request(leader)
    kept, aborted = add(sched, "r-1", prompt), add(sched, "r-2", prompt)
    sched.schedule()
    sched.finish_request(aborted, RequestStatus.FINISHED_ABORTED)
    assert sched.sharing == {"r-0": [kept]}
    sched.finish_request(leader, RequestStatus.FINISHED_ERROR)
    assert list(sched.waiting) == [kept] and sched.sharing == {}
    assert sched.schedule().chunks[0].num_tokens == 10
    sched.finish_request(kept, RequestStatus.FINISHED_ABORTED)
    assert_pool_free(sched.bm)


@pytest.mark.parametrize("length", [BS, BS - 1])
def test_a_prompt_of_one_block_or_less_is_not_held(length: int) -> None:
    """Nothing to share through the prefix cache: the local request is queued as usual."""
    sched = _remote_scheduler()
    sched.add_request(_remote("r-0", tokens(1, length)))
    local = add(sched, "r-1", tokens(1, length))
    assert list(sched.waiting)[-1] is local and sched.sharing == {}

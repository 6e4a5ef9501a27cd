"""The one-launch Triton sampler: greedy rows equal torch.argmax, temperature rows draw from
softmax(logits / T) (a frequency test over many rows), top-k/top-p/min-p rows from the distribution
the torch sampler truncates to, a seed reproduces its draws, and the sampler module sends plain
batches to it on CUDA without waiting for the GPU.

On CUDA the cases run on the GPU; without CUDA the small ones run under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernel is defined).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampling import SamplingParams
from pdserve.layers import sampler, triton_sampler

from .triton_env import CUDA, DEVICE, HAS_TRITON, fix_interpreter, gpu

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    if not CUDA and type(triton_sampler._sample_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernel was defined before TRITON_INTERPRET=1 was set")
    if not CUDA:
        fix_interpreter()


CASES = [(1, 50, torch.float32), (6, 5000, torch.float32), (3, 9000, torch.float16)]
GPU_CASES = [
    pytest.param(128, 152064, torch.bfloat16, marks=gpu),
    pytest.param(1, 151936, torch.bfloat16, marks=gpu),
]


@pytest.mark.parametrize("rows,vocab,dtype", CASES + GPU_CASES)
def test_greedy_rows_are_the_argmax(rows: int, vocab: int, dtype: torch.dtype) -> None:
    logits = torch.randn(rows, vocab).to(DEVICE, dtype)
    logits[0, vocab - 1] = 30.0  # a winner in the last, partial block
    got = triton_sampler.triton_sample(logits, [0.0] * rows)
    assert torch.equal(got.cpu(), logits.float().argmax(dim=-1).cpu())


def test_ties_go_to_the_first_index_like_torch() -> None:
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[0, [7, 4500]] = 1.0  # equal maxima in two different blocks
    logits[1, [4100, 4200]] = 2.0
    assert triton_sampler.triton_sample(logits, [0.0, 0.0]).tolist() == [7, 4100]


def test_temperature_rows_draw_from_the_softmax() -> None:
    rows, temp = (4000 if CUDA else 1500), 0.7  # the interpreter runs one program at a time
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2])
    logits = base.repeat(rows, 1).to(DEVICE)
    got = triton_sampler.triton_sample(logits, [temp] * rows, seed=1234).cpu()
    freq = torch.bincount(got, minlength=8).float() / rows
    want = (base / temp).softmax(-1)
    assert (freq - want).abs().max() < 4.5 * (0.25 / rows) ** 0.5, (freq, want)  # 4.5 sigma at worst


def test_uniform_logits_draw_every_part_of_a_block_alike() -> None:
    """One Philox call feeds the four quarters of a block (64 entries here): each quarter must get its
    own numbers, or ties with another quarter's entries would leave it undrawn."""
    rows = 4000 if CUDA else 1200
    got = triton_sampler.triton_sample(torch.zeros(rows, 64, device=DEVICE), [1.0] * rows, seed=99).cpu()
    quarters = torch.bincount(got // 16, minlength=4).float() / rows
    assert (quarters - 0.25).abs().max() < 4.5 * (0.25 * 0.75 / rows) ** 0.5, quarters
    assert torch.bincount(got, minlength=64).min() > 0


def test_a_seed_reproduces_and_a_new_seed_differs() -> None:
    logits = torch.zeros(64, 1000, device=DEVICE)  # uniform: every draw is the noise alone
    a = triton_sampler.triton_sample(logits, [1.0] * 64, seed=7)
    b = triton_sampler.triton_sample(logits, [1.0] * 64, seed=7)
    c = triton_sampler.triton_sample(logits, [1.0] * 64, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() > 40  # rows draw independently


@pytest.mark.parametrize("vocab", [9000, pytest.param(152064, marks=gpu)])
def test_the_draw_does_not_depend_on_how_rows_are_chunked(vocab: int) -> None:
    """The noise is keyed by (row, token index), so splitting a row over programs changes nothing:
    the same seed gives the same tokens with 1, 2, 4 or 8 chunks; greedy ties across chunks go to
    the first index."""
    logits = torch.randn(5, vocab, device=DEVICE)
    logits[4] = 0.0
    logits[4, [vocab - 3, 5]] = 9.0  # a greedy tie: first and last chunk
    temps = [1.0, 0.7, 1.3, 0.0, 0.0]
    draws = [triton_sampler.triton_sample(logits, temps, seed=5, chunks=c).tolist() for c in (1, 2, 4, 8)]
    assert all(d == draws[0] for d in draws), draws
    assert draws[0][3:] == [int(logits[3].argmax()), 5]
    assert triton_sampler.choose_chunks(1, vocab, DEVICE) > 1  # one row is split over programs


def test_mixed_greedy_and_temperature_rows() -> None:
    logits = torch.randn(4, 3000, device=DEVICE)
    logits[:, 11] = 50.0  # far ahead: temperature 1 picks it too
    logits[2] = 0.0
    got = triton_sampler.triton_sample(logits, [0.0, 1.0, 0.0, 1.0]).tolist()
    assert got[0] == got[1] == got[3] == 11 and got[2] == 0


def _torch_truncated(logits: torch.Tensor, temp: float, k: int, p: float, min_p: float) -> torch.Tensor:
    """The distribution the torch sampler draws from for one row (sampler._top_k_top_p, min-p)."""
    req = Request("r", [1], SamplingParams(temperature=temp, top_k=k, top_p=p, min_p=min_p))
    z = sampler._top_k_top_p(logits[None] / temp, [req])[0]
    probs = z.softmax(-1)
    return (
        torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
        / probs[probs >= min_p * probs.max()].sum()
    )


@pytest.mark.parametrize("k,p,min_p", [(3, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.3), (4, 0.9, 0.2)])
def test_truncated_rows_draw_from_what_the_torch_sampler_keeps(k: int, p: float, min_p: float) -> None:
    rows, temp = (4000 if CUDA else 300), 0.7  # the interpreter: ~50 ms a row for the search's passes
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2]).half()  # fp16: 4 passes, not 8
    filters = sampler.RowFilters([k] * rows, [p] * rows, [min_p] * rows)
    got = triton_sampler.triton_sample(base.repeat(rows, 1).to(DEVICE), [temp] * rows, 99, filters).cpu()
    want = _torch_truncated(base.float(), temp, k, p, min_p)
    freq = torch.bincount(got, minlength=8).float() / rows
    assert freq[want == 0].sum() == 0, (freq, want)  # never a token the torch sampler drops
    assert (freq - want).abs().max() < 4.5 * (0.25 / rows) ** 0.5, (freq, want)


@pytest.mark.parametrize("rows", [pytest.param(128, marks=gpu), pytest.param(1, marks=gpu)])
def test_truncated_draws_at_a_model_vocabulary_stay_in_the_kept_set(rows: int) -> None:
    """152k-entry bf16 rows shaped like a model's (a few peaked tokens over a wide tail), mixed
    filters per row: every draw is a token the torch sampler keeps, and top_k=1 is the argmax."""
    vocab = 152064
    logits = (torch.randn(rows, vocab, device=DEVICE) * 2.5).to(torch.bfloat16)
    logits[:, :6] += torch.tensor([15.0, 13.0, 12.5, 12.0, 11.0, 10.0], device=DEVICE).to(torch.bfloat16)
    mixes = [(50, 0.95, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (1, 1.0, 0.0), (20, 0.5, 0.1)]
    params = [mixes[i % len(mixes)] for i in range(rows)]
    filters = sampler.RowFilters([m[0] for m in params], [m[1] for m in params], [m[2] for m in params])
    reqs = [Request("r", [1], SamplingParams(top_k=k, top_p=p, min_p=m)) for k, p, m in params]
    z = logits.float() / 0.8
    probs = sampler._top_k_top_p(z, reqs).softmax(-1)
    # what torch keeps, and the tokens tied with its last kept one (bf16 rows tie often at a top-p cut
    # in the tail; torch's sort keeps some of them, the kernel all: both draw from the same law)
    cut = torch.where(probs > 0, z, float("inf")).min(-1, keepdim=True).values
    min_ps = torch.tensor([m[2] for m in params], device=DEVICE)[:, None]
    kept = (z >= cut) & (z >= z.max(-1, keepdim=True).values + min_ps.log())  # p >= min_p * p_max
    for seed in range(8):
        got = triton_sampler.triton_sample(logits, [0.8] * rows, seed, filters)
        assert kept.gather(1, got[:, None]).all(), seed
        top1 = [i for i, m in enumerate(params) if m[0] == 1]
        assert got[top1].tolist() == logits.float().argmax(-1)[top1].tolist()


def test_truncation_across_blocks_and_greedy_rows_in_the_same_batch() -> None:
    logits = torch.full((3, 5000), -5.0, device=DEVICE)
    logits[:, [10, 4990]] = 3.0  # the two likely tokens, in different 4096-entry blocks
    logits[:, 2000] = 2.9  # a close third
    logits[0, 3000:3100] = float("-inf")  # banned entries must not break the search for the cut
    filters = sampler.RowFilters([2, 2, 0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    draws = [triton_sampler.triton_sample(logits, [5.0, 0.0, 5.0], s, filters).tolist() for s in range(6)]
    assert all(d[0] in (10, 4990) and d[1] == 10 for d in draws)  # top-2 at T=5; greedy: first max
    assert {d[0] for d in draws} == {10, 4990}  # both kept and drawn
    assert any(d[2] not in (10, 4990, 2000) for d in draws)  # T=5, no filter: the tail is alive


@pytest.mark.parametrize(
    "params,plain",
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.8), True),
        (SamplingParams(top_k=-1, top_p=1.0), True),
        (SamplingParams(top_k=5), True),  # its cut searched first (triton_cut.py)
        (SamplingParams(top_p=0.9), True),
        (SamplingParams(min_p=0.1), True),
        (SamplingParams(seed=3), False),
        (SamplingParams(logprobs=2), False),
        (SamplingParams(repetition_penalty=1.1), False),
        (SamplingParams(min_tokens=2, max_tokens=4), False),
    ],
)
def test_which_requests_take_the_one_launch_path(params: SamplingParams, plain: bool) -> None:
    assert sampler.plain_sampling(Request("r", [1, 2], params)) is plain


@pytest.mark.parametrize(
    "params,drawn",
    [
        (SamplingParams(temperature=0.8, top_p=0.9), True),
        (SamplingParams(repetition_penalty=1.1, presence_penalty=0.5), True),  # applied first
        (SamplingParams(min_tokens=2, max_tokens=4), True),  # bans applied first
        (SamplingParams(seed=3), False),
        (SamplingParams(logprobs=2), False),
    ],
)
def test_which_requests_the_kernel_can_draw(params: SamplingParams, drawn: bool) -> None:
    assert sampler.kernel_draws(Request("r", [1, 2], params)) is drawn


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the dispatch picks the kernel for CUDA logits only")
def test_penalized_and_banned_rows_are_drawn_by_the_kernel_after_the_adjustments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy rows with a repetition penalty and a min_tokens ban: the kernel's argmax of the
    adjusted logits is the torch path's token, and the model's logits are left as they were."""
    calls = []
    real = triton_sampler.triton_sample
    monkeypatch.setattr(triton_sampler, "triton_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = torch.randn(2, 2000, device=DEVICE)
    logits[0, 5], logits[0, 9] = 9.0, 4.0  # 5 is in the prompt: divided by 3, below 9's 4
    logits[1, 7] = 9.0  # EOS, banned until min_tokens
    before = logits.clone()
    reqs = [
        Request("p", [5, 6], SamplingParams(temperature=0.0, repetition_penalty=3.0)),
        Request("b", [1], SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8), eos_token_ids=(7,)),
    ]
    got = [r.token_id for r in sampler.sample_later(logits, reqs).wait()]
    assert calls and torch.equal(logits, before)
    want, _ = sampler._sample_torch(logits, reqs)
    assert got == want.tolist() and got[0] != 5 and got[1] != 7


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the dispatch picks the kernel for CUDA logits only")
def test_sample_dispatches_plain_batches_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = triton_sampler.triton_sample
    monkeypatch.setattr(triton_sampler, "triton_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = torch.randn(3, 2000, device=DEVICE)
    greedy = [Request(f"r{i}", [1], SamplingParams(temperature=0.0)) for i in range(3)]
    out = sampler.sample_later(logits, greedy).wait()
    assert calls and [r.token_id for r in out] == logits.argmax(-1).tolist()
    calls.clear()
    sampler.sample_later(logits, greedy[:2] + [Request("s", [1], SamplingParams(seed=1))]).wait()
    assert not calls  # a seeded row sends the batch down the torch path


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the dispatch picks the kernel for CUDA logits only")
@pytest.mark.parametrize(
    ("switched_on", "params", "kernel"),
    [
        (True, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), True),
        (False, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), False),  # the torch sort is faster
        (False, SamplingParams(temperature=0.9, top_k=10), False),
        (False, SamplingParams(temperature=0.9, min_p=0.2), True),  # no search: the kernel is faster
        (False, SamplingParams(temperature=0.9, top_k=5000, min_p=0.2), True),  # top_k >= vocab is off
    ],
)
def test_truncated_batches_take_the_kernel_when_it_is_faster(
    monkeypatch: pytest.MonkeyPatch, switched_on: bool, params: SamplingParams, kernel: bool
) -> None:
    calls = []
    real = triton_sampler.triton_sample
    monkeypatch.setattr(triton_sampler, "triton_sample", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(sampler, "TRUNCATING_KERNEL", switched_on)
    logits = torch.randn(3, 2000, device=DEVICE)
    logits[:, 5] = 30.0
    reqs = [Request(f"r{i}", [1], params) for i in range(3)]
    out = sampler.sample_later(logits, reqs).wait()
    assert [r.token_id for r in out] == [5, 5, 5]
    assert bool(calls) is kernel
    if calls:
        top_k = params.top_k if 0 < params.top_k < 2000 else 0
        assert calls[0]["filters"].top_k == [top_k] * 3 and calls[0]["filters"].min_p == [params.min_p] * 3


def _queued_work_still_running_after(call: Callable[[], None]) -> bool:
    """Queue ~0.5 s of GPU sleep, then `call()`: True if the sleep was still running when it returned
    (the call queued its work without waiting for the GPU)."""
    torch.cuda._sleep(1 << 30)
    slept = torch.cuda.Event()
    slept.record()
    call()
    running = not slept.query()
    torch.cuda.synchronize()
    return running


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="host/GPU overlap exists on CUDA only")
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),  # the one-launch kernel
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=2, presence_penalty=0.5),  # torch
        SamplingParams(temperature=0.7, seed=3, min_p=0.1),  # torch, its own generator
    ],
)
def test_sampling_is_queued_without_waiting_for_the_gpu(params: SamplingParams) -> None:
    """sample_later must not synchronize (no pageable copies, no .tolist(), no unique()): a step
    launched ahead and the host's output building depend on it. Its results, read after, are right."""
    logits = torch.randn(4, 3000, device=DEVICE)
    logits[:, 7] = 40.0  # every row: token 7 is the only likely draw
    requests = [Request(f"r{i}", [1, 7, 7], params) for i in range(4)]
    for r in requests:
        r.append_token(7)  # an output token: the presence penalty applies
    sampler.sample_later(logits, requests).wait()  # warm: cached pinned blocks, compiled kernel
    pending = None

    def call() -> None:
        nonlocal pending
        pending = sampler.sample_later(logits, requests)

    assert _queued_work_still_running_after(call)
    assert pending is not None
    results = pending.wait()
    assert [r.token_id for r in results] == [7] * 4
    if params.logprobs:
        assert all(r.logprob is not None and r.logprob.top[0][0] == 7 for r in results)


@pytest.mark.parametrize("searching", [False, True], ids=["default", "truncating-kernel"])
def test_warm_sampler_launches_every_variant_serving_takes(
    monkeypatch: pytest.MonkeyPatch, searching: bool
) -> None:
    """What a GPU runner runs at start (engine/warmup.py) on its warm-up logits, in their dtype and
    in float32 (penalized rows): rows split over programs, whole rows, min-p, and (unless
    PDSERVE_TRUNCATING_KERNEL=0) the top-k, top-p and both searches; each a real launch that draws
    valid tokens."""
    from pdserve.engine.warmup import warm_sampler

    monkeypatch.setattr(sampler, "TRUNCATING_KERNEL", searching)

    calls, real = [], triton_sampler.triton_sample

    def recorded(logits: torch.Tensor, temperatures: list[float], **kw: object) -> torch.Tensor:
        out = real(logits, temperatures, **kw)  # type: ignore[arg-type]
        filters = kw.get("filters")
        cuts = None if filters is None else (filters.cuts_top_k(), filters.cuts_top_p())  # type: ignore[attr-defined]
        calls.append((logits.dtype, kw.get("chunks"), cuts, out.tolist()))
        return out

    monkeypatch.setattr(triton_sampler, "triton_sample", recorded)
    warm_sampler(torch.randn(2, 9000, device=DEVICE).half())  # the model's dtype, then float32
    searches = [(True, False), (False, True), (True, True)] if searching else []
    variants = [(None, None), (1, None), (None, (False, False))] + [(None, cut) for cut in searches]
    want = [(dtype, *v) for dtype in (torch.float16, torch.float32) for v in variants]
    assert [(d, c, f) for d, c, f, _ in calls] == want
    assert all(0 <= t < 9000 for *_, drawn in calls for t in drawn)

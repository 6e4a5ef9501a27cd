"""The one-launch Triton sampler: greedy rows equal torch.argmax, temperature rows draw from
softmax(logits / T) (a frequency test over many rows), top-k/top-p/min-p rows from the distribution
the torch sampler truncates to, a seed reproduces its draws, and the sampler module sends plain
batches to it on CUDA without waiting for the GPU.

On CUDA the cases run on the GPU; without CUDA the small ones run under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernel is defined), the frequency tests with fewer draws
(by_device). Each frequency test is a chi-square check (fit.py) that a correct sampler fails with
probability 1e-6; the draw counts are what it takes to catch, with probability above 0.999, the
errors named beside them (a temperature ignored, a top-k or top-p cut one token off, a min-p floor
off by half, a filter ignored).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pdserve.engine import sampler
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling import SamplingParams
from pdserve.kernels import sampling_triton
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.sampling import KernelSample, RowFilters, top_k_top_p

from .fit import fits
from .triton_env import CUDA, DEVICE, HAS_TRITON, by_device, gpu, grid, interpreted_or_skip

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreter_ready() -> None:
    interpreted_or_skip(sampling_triton._sample_kernel)


CASES = [(1, 50, torch.float32), (6, 5000, torch.float32), (3, 9000, torch.float16)]
GPU_CASES = [
    pytest.param(128, 152064, torch.bfloat16, marks=gpu),
    pytest.param(1, 151936, torch.bfloat16, marks=gpu),
]


@pytest.mark.parametrize("rows,vocab,dtype", CASES + GPU_CASES)
def test_greedy_rows_are_the_argmax(rows: int, vocab: int, dtype: torch.dtype) -> None:
    logits = torch.randn(rows, vocab).to(DEVICE, dtype)
    logits[0, vocab - 1] = 30.0  # a winner in the last, partial block
    got = sampling_triton.triton_sample(logits, [0.0] * rows)
    assert torch.equal(got.cpu(), logits.float().argmax(dim=-1).cpu())


def test_ties_go_to_the_first_index_like_torch() -> None:
    logits = torch.zeros(2, 5000, device=DEVICE)
    logits[0, [7, 4500]] = 1.0  # equal maxima in two different blocks
    logits[1, [4100, 4200]] = 2.0
    assert sampling_triton.triton_sample(logits, [0.0, 0.0]).tolist() == [7, 4100]


def test_temperature_rows_draw_from_the_softmax() -> None:
    rows, temp = by_device(1000, 4000), 0.7  # 1000: catches T ignored, T squared, 1 / T
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2])
    logits = base.repeat(rows, 1).to(DEVICE)
    got = sampling_triton.triton_sample(logits, [temp] * rows, seed=1234).cpu()
    counts = torch.bincount(got, minlength=8)
    want = (base / temp).softmax(-1)
    assert fits(counts, want), (counts / rows, want)


def test_uniform_logits_draw_every_part_of_a_block_alike() -> None:
    """One Philox call feeds the four quarters of a block (the whole row here): each quarter must get
    its own numbers, or ties with another quarter's entries would leave it undrawn. On CPU 400
    draws of 16 entries: a token is left undrawn by chance with probability 16 * (15/16)^400 < 1e-10."""
    rows, vocab = by_device(400, 4000), by_device(16, 64)
    logits = torch.zeros(rows, vocab, device=DEVICE)
    got = sampling_triton.triton_sample(logits, [1.0] * rows, seed=99).cpu()
    assert fits(torch.bincount(got // (vocab // 4), minlength=4), torch.full((4,), 0.25))
    assert torch.bincount(got, minlength=vocab).min() > 0


def test_a_seed_reproduces_and_a_new_seed_differs() -> None:
    logits = torch.zeros(64, 1000, device=DEVICE)  # uniform: every draw is the noise alone
    a = sampling_triton.triton_sample(logits, [1.0] * 64, seed=7)
    b = sampling_triton.triton_sample(logits, [1.0] * 64, seed=7)
    c = sampling_triton.triton_sample(logits, [1.0] * 64, seed=8)
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
    draws = [sampling_triton.triton_sample(logits, temps, seed=5, chunks=c).tolist() for c in (1, 2, 4, 8)]
    assert all(d == draws[0] for d in draws), draws
    assert draws[0][3:] == [int(logits[3].argmax()), 5]
    assert sampling_triton.choose_chunks(1, vocab, DEVICE) > 1  # one row is split over programs


def test_mixed_greedy_and_temperature_rows() -> None:
    logits = torch.randn(4, 3000, device=DEVICE)
    logits[:, 11] = 50.0  # far ahead: temperature 1 picks it too
    logits[2] = 0.0
    got = sampling_triton.triton_sample(logits, [0.0, 1.0, 0.0, 1.0]).tolist()
    assert got[0] == got[1] == got[3] == 11 and got[2] == 0


def _torch_truncated(logits: torch.Tensor, temp: float, k: int, p: float, min_p: float) -> torch.Tensor:
    """The distribution the torch reference draws from for one row (top_k_top_p, then min-p)."""
    z = top_k_top_p(logits[None] / temp, [k], [p])[0]
    probs = z.softmax(-1)
    return (
        torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
        / probs[probs >= min_p * probs.max()].sum()
    )


@pytest.mark.parametrize(
    "k,p,min_p,cpu_rows",
    grid(
        # under the interpreter (minutes of CPU for the three below) only the case that combines
        # every filter; each filter alone is checked where the kernel runs, on a GPU (make test-gpu)
        cpu=[(4, 0.9, 0.2, 80)],
        full=[
            (3, 1.0, 0.0, 200),  # 200: catches k + 1, k - 1, no cut
            (0, 0.8, 0.0, 200),  # 200: catches p + 0.1, p - 0.1 (one token more, one less), no cut
            (0, 1.0, 0.3, 100),  # 100: catches min_p / 1.5, no floor, T ignored
            (4, 0.9, 0.2, 80),  # 80: catches no filters, T ignored (each filter alone is checked above)
        ],
    ),
)
def test_truncated_rows_draw_from_what_the_torch_sampler_keeps(
    k: int, p: float, min_p: float, cpu_rows: int
) -> None:
    rows, temp = by_device(cpu_rows, 4000), 0.7  # the interpreter runs the search's passes row by row
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, -3.0, 0.2]).half()  # fp16: 4 passes, not 8
    filters = RowFilters([k] * rows, [p] * rows, [min_p] * rows)
    got = sampling_triton.triton_sample(base.repeat(rows, 1).to(DEVICE), [temp] * rows, 99, filters).cpu()
    want = _torch_truncated(base.float(), temp, k, p, min_p)
    counts = torch.bincount(got, minlength=8)
    assert fits(counts, want), (counts / rows, want)  # never a token the torch reference drops


@pytest.mark.parametrize("rows", [pytest.param(128, marks=gpu), pytest.param(1, marks=gpu)])
def test_truncated_draws_at_a_model_vocabulary_stay_in_the_kept_set(rows: int) -> None:
    """152k-entry bf16 rows shaped like a model's (a few peaked tokens over a wide tail), mixed
    filters per row: every draw is a token the torch sampler keeps, and top_k=1 is the argmax."""
    vocab = 152064
    logits = (torch.randn(rows, vocab, device=DEVICE) * 2.5).to(torch.bfloat16)
    logits[:, :6] += torch.tensor([15.0, 13.0, 12.5, 12.0, 11.0, 10.0], device=DEVICE).to(torch.bfloat16)
    mixes = [(50, 0.95, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (1, 1.0, 0.0), (20, 0.5, 0.1)]
    params = [mixes[i % len(mixes)] for i in range(rows)]
    filters = RowFilters([m[0] for m in params], [m[1] for m in params], [m[2] for m in params])
    z = logits.float() / 0.8
    probs = top_k_top_p(z, filters.top_k, filters.top_p).softmax(-1)
    # what torch keeps, and the tokens tied with its last kept one (bf16 rows tie often at a top-p cut
    # in the tail; torch's sort keeps some of them, the kernel all: both draw from the same law)
    cut = torch.where(probs > 0, z, float("inf")).min(-1, keepdim=True).values
    min_ps = torch.tensor([m[2] for m in params], device=DEVICE)[:, None]
    kept = (z >= cut) & (z >= z.max(-1, keepdim=True).values + min_ps.log())  # p >= min_p * p_max
    for seed in range(8):
        got = sampling_triton.triton_sample(logits, [0.8] * rows, seed, filters)
        assert kept.gather(1, got[:, None]).all(), seed
        top1 = [i for i, m in enumerate(params) if m[0] == 1]
        assert got[top1].tolist() == logits.float().argmax(-1)[top1].tolist()


def test_truncation_across_blocks_and_greedy_rows_in_the_same_batch() -> None:
    logits = torch.full((3, 5000), -5.0, device=DEVICE)
    logits[:, [10, 4990]] = 3.0  # the two likely tokens, in different 4096-entry blocks
    logits[:, 2000] = 2.9  # a close third
    logits[0, 3000:3100] = float("-inf")  # banned entries must not break the search for the cut
    filters = RowFilters([2, 2, 0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    draws = [sampling_triton.triton_sample(logits, [5.0, 0.0, 5.0], s, filters).tolist() for s in range(6)]
    assert all(d[0] in (10, 4990) and d[1] == 10 for d in draws)  # top-2 at T=5; greedy: first max
    assert {d[0] for d in draws} == {10, 4990}  # both kept and drawn
    assert any(d[2] not in (10, 4990, 2000) for d in draws)  # T=5, no filter: the tail is alive


@pytest.mark.parametrize(
    "params,plain",
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.8), True),
        (SamplingParams(top_k=-1, top_p=1.0), True),
        (SamplingParams(top_k=5), True),  # its cut searched first (truncation_triton.py)
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


def _recording(kernel: KernelSample, calls: list[dict[str, object]]) -> KernelSample:
    """`kernel`, each call's keyword arguments appended to `calls`."""

    def recorded(logits: torch.Tensor, temperatures: list[float], **kw: object) -> torch.Tensor:
        calls.append(kw)
        return kernel(logits, temperatures, **kw)  # type: ignore[arg-type]

    return recorded


def _argmax_kernel(logits: torch.Tensor, temperatures: list[float], **kw: object) -> torch.Tensor:
    """A stand-in for the kernel where only the dispatch is under test: the greedy token."""
    return logits.float().argmax(-1)


def test_the_kernel_config_chooses_the_sampler_once() -> None:
    """A CPU runner's default is the torch path (no triton import); triton=True takes the kernel
    (on CPU: under the interpreter); truncating_sampler=off keeps top-k/top-p rows off it."""
    cpu = torch.device("cpu")
    assert Sampler.for_device(KernelConfig(), cpu) == Sampler(None, True)
    chosen = Sampler.for_device(KernelConfig(triton=True, truncating_sampler=False), cpu)
    assert chosen.kernel is sampling_triton.triton_sample and not chosen.truncating


@pytest.mark.parametrize(
    ("truncating", "params", "kernel"),
    [
        (True, SamplingParams(temperature=0.0), True),
        (True, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), True),
        (False, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), False),  # the torch sort
        (False, SamplingParams(temperature=0.9, top_k=10), False),
        (False, SamplingParams(temperature=0.9, min_p=0.2), True),  # no search: always the kernel
        (False, SamplingParams(temperature=0.9, top_k=5000, min_p=0.2), True),  # top_k >= vocab is off
        (True, SamplingParams(temperature=0.9, seed=1), False),  # its own generator
        (True, SamplingParams(temperature=0.9, logprobs=1), False),
    ],
)
def test_which_batches_the_sampler_sends_to_the_kernel(
    truncating: bool, params: SamplingParams, kernel: bool
) -> None:
    """The dispatch alone, on any device: a stand-in kernel records what it is given."""
    calls: list[dict[str, object]] = []
    chosen = Sampler(_recording(_argmax_kernel, calls), truncating)
    logits = torch.randn(3, 2000)
    logits[:, 5] = 30.0
    out = chosen.sample_later(logits, [Request(f"r{i}", [1], params) for i in range(3)]).wait()
    assert [r.token_id for r in out] == [5, 5, 5]
    assert bool(calls) is kernel
    if calls and not params.greedy:
        filters = calls[0]["filters"]
        assert isinstance(filters, RowFilters)
        top_k = params.top_k if 0 < params.top_k < 2000 else 0
        assert filters.top_k == [top_k] * 3 and filters.min_p == [params.min_p] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="a real draw on the GPU")
def test_penalized_and_banned_rows_are_drawn_by_the_kernel_after_the_adjustments() -> None:
    """Greedy rows with a repetition penalty and a min_tokens ban: the kernel's argmax of the
    adjusted logits is the torch path's token, and the model's logits are left as they were."""
    calls: list[dict[str, object]] = []
    chosen = Sampler(_recording(sampling_triton.triton_sample, calls))
    logits = torch.randn(2, 2000, device=DEVICE)
    logits[0, 5], logits[0, 9] = 9.0, 4.0  # 5 is in the prompt: divided by 3, below 9's 4
    logits[1, 7] = 9.0  # EOS, banned until min_tokens
    before = logits.clone()
    reqs = [
        Request("p", [5, 6], SamplingParams(temperature=0.0, repetition_penalty=3.0)),
        Request("b", [1], SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8), eos_token_ids=(7,)),
    ]
    got = [r.token_id for r in chosen.sample_later(logits, reqs).wait()]
    assert calls and torch.equal(logits, before)
    want, _ = sampler.sample_torch(logits, reqs)
    assert got == want.tolist() and got[0] != 5 and got[1] != 7


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="a real draw on the GPU")
@pytest.mark.parametrize(
    ("truncating", "params", "kernel"),
    [
        (True, SamplingParams(temperature=0.0), True),
        (True, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), True),
        (False, SamplingParams(temperature=0.9, top_p=0.8, top_k=10), False),
        (False, SamplingParams(temperature=0.9, min_p=0.2), True),
    ],
)
def test_the_kernel_draws_what_the_dispatch_sends_it(
    truncating: bool, params: SamplingParams, kernel: bool
) -> None:
    calls: list[dict[str, object]] = []
    chosen = Sampler(_recording(sampling_triton.triton_sample, calls), truncating)
    logits = torch.randn(3, 2000, device=DEVICE)
    logits[:, 5] = 30.0
    out = chosen.sample_later(logits, [Request(f"r{i}", [1], params) for i in range(3)]).wait()
    assert [r.token_id for r in out] == [5, 5, 5]
    assert bool(calls) is kernel


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
    chosen = Sampler(sampling_triton.triton_sample)
    chosen.sample_later(logits, requests).wait()  # warm: cached pinned blocks, compiled kernel
    pending = None

    def call() -> None:
        nonlocal pending
        pending = chosen.sample_later(logits, requests)

    assert _queued_work_still_running_after(call)
    assert pending is not None
    results = pending.wait()
    assert [r.token_id for r in results] == [7] * 4
    if params.logprobs:
        assert all(r.logprob is not None and r.logprob.top[0][0] == 7 for r in results)


@pytest.mark.parametrize("searching", [False, True], ids=["default", "truncating-kernel"])
def test_warm_sampler_launches_every_variant_serving_takes(searching: bool) -> None:
    """What a GPU runner runs at start (engine/warmup.py) on its warm-up logits, in their dtype and
    in float32 (penalized rows): rows split over programs, whole rows, min-p, and (unless the
    KernelConfig's truncating_sampler is off) the top-k, top-p and both searches; each a real launch
    that draws valid tokens. On CPU a vocabulary just large enough to split rows over programs."""
    from pdserve.engine.warmup import warm_sampler

    calls = []

    def recorded(logits: torch.Tensor, temperatures: list[float], **kw: object) -> torch.Tensor:
        out = sampling_triton.triton_sample(logits, temperatures, **kw)  # type: ignore[arg-type]
        filters = kw.get("filters")
        cuts = None if filters is None else (filters.cuts_top_k(), filters.cuts_top_p())  # type: ignore[attr-defined]
        calls.append((logits.dtype, kw.get("chunks"), cuts, out.tolist()))
        return out

    vocab = by_device(4100, 9000)  # 4100: two chunks of at least 2048 entries
    warm_sampler(Sampler(recorded, searching), torch.randn(2, vocab, device=DEVICE).half())
    searches = [(True, False), (False, True), (True, True)] if searching else []
    variants = [(None, None), (1, None), (None, (False, False))] + [(None, cut) for cut in searches]
    want = [(dtype, *v) for dtype in (torch.float16, torch.float32) for v in variants]
    assert [(d, c, f) for d, c, f, _ in calls] == want
    assert all(0 <= t < vocab for *_, drawn in calls for t in drawn)
    assert sampling_triton.choose_chunks(2, vocab, DEVICE) > 1  # the default calls split rows

"""`pdserve profile`: time the real engine (pdserve.engine, through LLM) step by step -> a Profile.

    prefill(T, P)   a fresh request whose first P tokens are cached (a warm-up request computed them)
                    and T new ones, max_tokens 1: the wall time from the step that takes it to its
                    token (median of `repeats`)
    decode(B, C)    B requests of C-token prompts, all decoding: wall time per step over `steps`
                    steps (tokens out / B), so host work a GPU step overlaps is not counted twice
    mixed(T, B)     B decoding (context: the middle decode context) and a T-token prompt arriving: the
                    time the decodes take for `steps` tokens, less `steps` - 1 of their plain steps;
                    what the step carrying the prompt costs them, and the prompt its first token
    transfer        pdserve's tcp transport on loopback (transfer_probe.py); on CUDA also a
                    device-to-device copy, the floor of a cuda_ipc hand-off on one host
    pool            the engine's own KV pool (blocks), as `pdserve serve` with the same options gets

The step times include everything Engine.step does (schedule, run, sample, detokenize), not HTTP.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.planning.profile import Curve, Grid, MixedGrid, Profile


@dataclass(frozen=True)
class Points:
    """What to measure."""

    prefill_tokens: tuple[int, ...]
    prefill_cached: tuple[int, ...]
    decode_batch: tuple[int, ...]
    decode_context: tuple[int, ...]
    transfer_blocks: tuple[int, ...]
    repeats: int = 3
    steps: int = 6
    mixed_tokens: tuple[int, ...] = ()  # none: mixed steps priced from prefill and decode (costs.py)
    mixed_batch: tuple[int, ...] = ()


MAX_PROBE_BYTES = 1 << 29
QUICK = Points(
    (16, 64), (0, 32), (1, 4), (16, 64), (1, 16), repeats=1, steps=2, mixed_tokens=(16,), mixed_batch=(1,)
)
CPU = Points(
    (16, 64, 256, 512, 1024),
    (0, 256),
    (1, 2, 4, 8, 16),
    (64, 256, 512),
    (1, 16, 64, 256),
    mixed_tokens=(64, 256, 1024),
    mixed_batch=(1, 4),
)
CUDA = Points(
    (64, 256, 1024, 2048, 4096, 8192),
    (0, 2048, 8192),
    (1, 8, 32, 64, 128, 256),
    (256, 1024, 2048, 4096),
    (1, 16, 64, 256, 1024),
    mixed_tokens=(256, 1024, 1792),
    mixed_batch=(1, 8, 32, 128),
)


class EngineProbe:
    """Runs requests through one engine and times them."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.vocab = int(self.engine.hf_config.vocab_size)
        self.rng = random.Random(0)
        self.ids = 0
        self.sync: Callable[[], None] = _device_sync(self.engine.runner.device)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        from pdserve.engine.sampling import SamplingParams

        self.ids += 1
        rid = f"profile-{self.ids}"
        self.engine.add_request(
            rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        )
        return rid

    def run_to_end(self, prompt: list[int]) -> float:
        """Seconds from the first step that can take this one-token request to its token."""
        rid = self._add(prompt, 1)
        self.sync()
        start = time.perf_counter()
        while True:
            if any(o.request_id == rid and o.finished for o in self.engine.step()):
                self.sync()
                return time.perf_counter() - start

    def prefill(self, tokens: int, cached: int, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            prefix = self.prompt(cached)
            if cached:
                self.run_to_end(prefix + self.prompt(1))  # its full blocks are now cached
            times.append(self.run_to_end(prefix + self.prompt(tokens)))
        return statistics.median(times)

    def decode(self, batch: int, context: int, steps: int) -> float:
        rids = self._decoding(batch, context)
        seconds = self._decode_tokens(rids, steps, None)[0] / steps
        self._abort(rids)
        return seconds

    def mixed(self, tokens: int, batch: int, context: int, steps: int) -> float:
        """Seconds of the step that computes a `tokens` prompt beside `batch` decodes of `context`."""
        rids = self._decoding(batch, context)
        plain = self._decode_tokens(rids, steps, None)[0] / steps
        elapsed, took = self._decode_tokens(rids, steps, self.prompt(tokens))
        self._abort(rids)
        return max(plain, elapsed - (took - 1) * plain)

    def _decoding(self, batch: int, context: int) -> set[str]:
        rids = {self._add(self.prompt(context), 1 << 20) for _ in range(batch)}
        started: set[str] = set()
        while started != rids:
            started |= {o.request_id for o in self.engine.step() if o.new_token_ids}
        return rids

    def _decode_tokens(self, rids: set[str], steps: int, prompt: list[int] | None) -> tuple[float, int]:
        """(seconds, decode steps) until every one of `rids` has `steps` more tokens (and `prompt`, if
        given, added first, has its token): each decode gets one token a step, mixed or not."""
        self.sync()
        start, tokens, batch = time.perf_counter(), 0, len(rids)
        waiting = self._add(prompt, 1) if prompt is not None else None
        while tokens < steps * batch or waiting is not None:
            for o in self.engine.step():
                if o.request_id in rids:
                    tokens += len(o.new_token_ids)
                elif o.request_id == waiting and o.finished:
                    waiting = None
        self.sync()
        return time.perf_counter() - start, tokens // batch

    def _abort(self, rids: set[str]) -> None:
        for rid in rids:
            self.engine.abort_request(rid)
        while self.engine.has_unfinished():
            self.engine.step()


def measure(llm: Any, points: Points, log: Callable[[str], None] = print) -> Profile:
    """A profile of the engine `llm` runs (an LLM instance), at `points`."""
    probe = EngineProbe(llm)
    engine, cfg = probe.engine, probe.engine.config
    probe.run_to_end(probe.prompt(8))  # warm-up
    kv_token = kv_bytes_per_token(engine)
    return Profile(
        model=engine.model_name,
        tp=cfg.model.tensor_parallel_size,
        block_size=cfg.cache.block_size,
        num_blocks=engine.block_manager.num_blocks,
        kv_bytes_per_token=kv_token,
        max_num_seqs=cfg.scheduler.max_num_seqs,
        max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
        prefill=prefill_grid(probe, points, log),
        decode=decode_grid(probe, points, log),
        mixed=mixed_grid(probe, points, log),
        transfer=transfers(
            engine, [n * cfg.cache.block_size * kv_token for n in points.transfer_blocks], log
        ),
        meta=describe_machine(engine),
    )


def prefill_grid(probe: EngineProbe, points: Points, log: Callable[[str], None]) -> Grid:
    engine = probe.engine
    tokens = [t for t in points.prefill_tokens if t <= engine.config.scheduler.max_num_batched_tokens]
    cached = [c for c in points.prefill_cached if c + max(tokens) <= engine.max_model_len - 2]
    rows = []
    for t in tokens:
        rows.append(tuple(probe.prefill(t, c, points.repeats) for c in cached))
        shown = (f"{c} cached {s * 1e3:.1f} ms" for c, s in zip(cached, rows[-1], strict=True))
        log(f"prefill {t:>6} tokens: " + ", ".join(shown))
    return Grid(tuple(map(float, tokens)), tuple(map(float, cached)), tuple(rows))


def decode_grid(probe: EngineProbe, points: Points, log: Callable[[str], None]) -> Grid:
    engine = probe.engine
    pool_tokens = engine.block_manager.num_blocks * engine.block_manager.block_size
    batches = [b for b in points.decode_batch if b <= engine.config.scheduler.max_num_seqs] or [1]
    while len(batches) > 1 and pool_tokens // batches[-1] - 64 < points.decode_context[0]:
        batches.pop()  # a pool too small for this batch at the shortest context
    room = min(pool_tokens // batches[-1], engine.max_model_len) - 64  # each sequence and its outputs
    contexts = [c for c in points.decode_context if c <= room] or [max(1, room)]
    rows = []
    for b in batches:
        rows.append(tuple(probe.decode(b, c, points.steps) for c in contexts))
        shown = (f"ctx {c} {s * 1e3:.1f} ms" for c, s in zip(contexts, rows[-1], strict=True))
        log(f"decode batch {b:>4}: " + ", ".join(shown))
    return Grid(tuple(map(float, batches)), tuple(map(float, contexts)), tuple(rows))


def mixed_grid(probe: EngineProbe, points: Points, log: Callable[[str], None]) -> MixedGrid | None:
    """Steps of a prompt chunk beside decodes, at the middle decode context (None: no points)."""
    sched = probe.engine.config.scheduler
    context = sorted(points.decode_context)[len(points.decode_context) // 2]
    batches = [b for b in points.mixed_batch if b < sched.max_num_seqs]
    tokens = [t for t in points.mixed_tokens if t + max(batches, default=0) <= sched.max_num_batched_tokens]
    if not batches or not tokens or context + max(tokens) >= probe.engine.max_model_len - 64:
        return None
    rows = []
    for t in tokens:
        rows.append(tuple(probe.mixed(t, b, context, points.steps) for b in batches))
        shown = (f"batch {b} {s * 1e3:.1f} ms" for b, s in zip(batches, rows[-1], strict=True))
        log(f"mixed {t:>6} prompt tokens: " + ", ".join(shown))
    grid = Grid(tuple(map(float, tokens)), tuple(map(float, batches)), tuple(rows))
    return MixedGrid(grid, float(context))


def transfers(engine: Any, sizes: list[int], log: Callable[[str], None]) -> dict[str, Curve]:
    from pdserve.planning.transfer_probe import device_copy_curve, tcp_curve

    sizes = [n for n in sizes if n <= MAX_PROBE_BYTES] or [min(sizes)]  # larger: extrapolated
    out = {"tcp": tcp_curve(sizes)}
    if engine.runner.device.type == "cuda":
        out["cuda_ipc"] = device_copy_curve(sizes, engine.runner.device)
    for name, curve in out.items():
        shown = (f"{x / 2**20:.2f} MiB {y * 1e3:.2f} ms" for x, y in zip(curve.xs, curve.ys, strict=True))
        log(f"transfer {name}: " + ", ".join(shown))
    return out


def kv_bytes_per_token(engine: Any) -> int:
    """KV bytes of one token, every layer and every KV head (what a hand-off moves, at any TP)."""
    lay, hf = engine.runner.layout, engine.hf_config
    elem = engine.runner.kv_cache.element_size()
    return int(lay.num_layers * 2 * int(hf.num_key_value_heads) * lay.head_dim * elem)


def describe_machine(engine: Any) -> dict[str, Any]:
    import torch
    import transformers

    device = engine.runner.device
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(engine.runner.dtype),
        "load_format": engine.config.model.load_format,
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_cores_usable": cores,
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "pdserve": _pdserve_version(),
        },
    }


def _pdserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"


def _device_sync(device: Any) -> Callable[[], None]:
    if device.type != "cuda":
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)

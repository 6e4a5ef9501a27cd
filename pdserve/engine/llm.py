"""The offline API: `LLM(model).generate(prompts, params)` and `LLM(model).chat(messages)`.

`LLM(model, prefill=1, decode=1)` runs the same requests disaggregated inside this process: separate
prefill and decode engines (separate KV pools) joined by the in-process KV transport.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.cluster_secret import ClusterSecret
from pdserve.config import EngineConfig
from pdserve.disagg.handoff import FromPrefill
from pdserve.engine.engine import Engine
from pdserve.engine.request import Logprob
from pdserve.engine.resume import Resume
from pdserve.engine.sampling import SamplingParams
from pdserve.kernels.config import KernelConfig
from pdserve.options import offline_engine_config


@dataclass
class Completion:
    """One finished request: its text and token ids, and why it stopped."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None


def _start_engines(
    config: EngineConfig, prefill: int, decode: int, prefill_tp: int
) -> tuple[list[Engine], list[Engine]]:
    """(prefill engines, engines that answer): one colocated engine, or `prefill` prefill engines
    (TP prefill_tp) and `decode` decode engines joined by config.disagg.kv_transport."""
    if (prefill > 0) != (decode > 0):
        raise ValueError("disaggregated serving needs at least one prefill and one decode engine")
    if config.disagg.cluster_secret is None and config.disagg.kv_transport != "inproc":
        # engines of one process on network ports: a secret of their own, which nobody else holds
        secret = ClusterSecret.from_text(secrets.token_urlsafe(32))
        config = replace(config, disagg=replace(config.disagg, cluster_secret=secret))
    prefill_config = replace(
        config,
        model=replace(config.model, tensor_parallel_size=prefill_tp),
        disagg=replace(config.disagg, role="prefill"),
    )
    # only a prefill engine sends KV, so only it streams layers
    decode_config = replace(config, disagg=replace(config.disagg, role="decode", stream_layers=False))
    prefill_engines = [Engine(prefill_config) for _ in range(prefill)]
    decode_engines = [Engine(decode_config) for _ in range(decode)]
    return prefill_engines, decode_engines or [Engine(config)]


class LLM:
    """Engines in this process, run to completion on each call.

    `options` are those of `pdserve serve` by their keyword names (pdserve/options.py: max_num_seqs,
    num_blocks, enable_prefix_caching, tensor_parallel_size, kv_transport, kv_stream_layers, ...),
    but for the HTTP server's and the KV endpoint's; here `device` defaults to cpu and `kv_transport`
    to inproc. `prefill`/`decode` > 0 run that many engines of each role, disaggregated in this process.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        prefill: int = 0,
        decode: int = 0,
        prefill_tensor_parallel_size: int | None = None,  # the prefill engines' TP (default: the same)
        kernels: KernelConfig | str | None = None,  # a KernelConfig, or its spec: "pdl=off,split_norm=off"
        **options: Any,
    ) -> None:
        config = offline_engine_config(model=model, kernels=kernels, **options)
        prefill_tp = prefill_tensor_parallel_size or config.model.tensor_parallel_size
        self.prefill_engines, self.engines = _start_engines(config, prefill, decode, prefill_tp)
        self.engine = self.engines[0]
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Run all prompts (strings or token id lists) to completion, batched; results in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return self.generate_ids(token_lists, params or SamplingParams())

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[Completion]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate_ids(token_lists, params or SamplingParams())

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        out: Any = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]

    def generate_ids(
        self,
        token_lists: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        resumes: list[Resume | None] | None = None,
    ) -> list[Completion]:
        """Run token id prompts to completion, with one SamplingParams for all or one per prompt.
        resumes[i]: prompt i continues after those outputs (engine/resume.py); its Completion holds
        the tokens and text that come after them."""
        per_prompt = params if isinstance(params, list) else [params] * len(token_lists)
        if len(per_prompt) != len(token_lists):
            raise ValueError("params: one SamplingParams, or one per prompt")
        results: dict[str, Completion] = {}
        order = []
        for i, ids in enumerate(token_lists):
            rid = f"offline-{next(self._ids)}"
            transfer = None
            if self.prefill_engines:
                prefill = self.prefill_engines[i % len(self.prefill_engines)]
                transfer = FromPrefill(prefill.connector.address) if prefill.connector else None
            resume = resumes[i] if resumes else None
            self.engines[i % len(self.engines)].add_request(rid, ids, per_prompt[i], transfer, resume)
            results[rid] = Completion(prompt_token_ids=list(ids))
            order.append(rid)
        while any(e.has_unfinished() for e in self.engines):
            for p in self.prefill_engines:
                p.step()  # no client output: its requests finish by handing KV to a decode engine
            outputs = [o for e in self.engines for o in e.step()]
            if not outputs and self.prefill_engines:
                time.sleep(0.001)  # KV is on its way through another thread
            for out in outputs:
                c = results[out.request_id]
                c.token_ids.extend(out.new_token_ids)
                c.text += out.new_text
                c.logprobs.extend(out.new_logprobs)
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason
                    c.error = out.error
        return [results[r] for r in order]

    def check_pool_free(self) -> bool:
        return all(e.check_pool_free() for e in self.engines + self.prefill_engines)

    def close(self) -> None:
        for e in self.engines + self.prefill_engines:
            e.close()

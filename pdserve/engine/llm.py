"""The offline API: `LLM(model).generate(prompts, params)` and `LLM(model).chat(messages)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import Engine
from pdserve.engine.request import Logprob
from pdserve.engine.sampling import SamplingParams


@dataclass
class Completion:
    """One finished request: its text and token ids, and why it stopped."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    num_cached_tokens: int = 0


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(
                path=model or "", dtype=dtype, device=device, max_model_len=max_model_len, seed=seed
            ),
            cache=CacheConfig(
                block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=1 << 30
            ),
        )
        self.engine = Engine(config)
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

    def generate_ids(self, token_lists: list[list[int]], params: SamplingParams) -> list[Completion]:
        results: dict[str, Completion] = {}
        order = []
        for ids in token_lists:
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, params)
            results[rid] = Completion(prompt_token_ids=list(ids))
            order.append(rid)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                c = results[out.request_id]
                c.token_ids.extend(out.new_token_ids)
                c.text += out.new_text
                c.logprobs.extend(out.new_logprobs)
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [results[r] for r in order]

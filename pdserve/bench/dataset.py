"""The `random` dataset: prompts of exactly the requested token count for the served model's tokenizer.

A prompt is random token ids decoded to text. Decoding and encoding again rarely gives back the same
ids (neighbours merge, invalid UTF-8 becomes U+FFFD), so the text is re-encoded and trimmed or topped up
with fresh random ids until encoding it gives exactly the target count:

    ids --decode--> text --encode--> ids' ; len(ids') == target ? done : fix the tail of ids', repeat

Counts are without special tokens (a tokenizer that adds BOS to a completion prompt adds it on top).
A shared prefix (`prefix_len`) is the same text at the start of every prompt; the counts include it.
One seed gives the same prompts every time; a `salt` mixed into it gives others of the same sizes (so a
rerun cannot be answered from the server's prefix cache: repeats.py).
This module knows nothing about HTTP or timing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

MAX_FIX_ROUNDS = 16
MAX_DRAWS = 8


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: its text, its token count, and how many tokens to ask for."""

    prompt: str
    input_len: int
    output_len: int


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def sample_lengths(rng: random.Random, num: int, mean: int, range_ratio: float) -> list[int]:
    """`num` lengths uniform in [mean*(1-r), mean*(1+r)] (at least 1 each); r = 0 gives `mean` each."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1): {range_ratio}")
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


class PromptMaker:
    """Random texts of exact token counts, drawn from the tokenizer's ordinary (non-special) tokens."""

    def __init__(self, tokenizer: Any, rng: random.Random) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        self.vocab = [i for i in range(tokenizer.vocab_size) if i not in special]

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.vocab) for _ in range(n)]

    def text(self, num_tokens: int, head: str = "") -> str:
        """`head` followed by random text, so that the whole encodes to exactly `num_tokens` tokens."""
        for _ in range(MAX_DRAWS):
            text = self._fit(head, num_tokens)
            if text is not None:
                return text
        raise ValueError(f"could not make a text of exactly {num_tokens} tokens with this tokenizer")

    def _fit(self, head: str, target: int) -> str | None:
        head_len = self.count(head) if head else 0
        ids = self.encode(head) + self.random_ids(target - head_len)
        for _ in range(MAX_FIX_ROUNDS):
            text = head + self.tokenizer.decode(ids[head_len:])
            ids = self.encode(text)
            if len(ids) == target:
                return text
            if len(ids) > target:
                ids = ids[:target]
            else:
                ids += self.random_ids(target - len(ids))
        return None


def random_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
    salt: str | None = None,
) -> list[BenchRequest]:
    """`num_prompts` prompts of `prefix_len` + about `input_len` tokens (the same ones for one seed
    and salt)."""
    rng = random.Random(seed if salt is None else f"{seed}:{salt}")
    maker = PromptMaker(tokenizer, rng)
    input_lens = sample_lengths(rng, num_prompts, input_len, range_ratio)
    output_lens = sample_lengths(rng, num_prompts, output_len, range_ratio)
    prefix = maker.text(prefix_len) if prefix_len > 0 else ""
    return [
        BenchRequest(maker.text(prefix_len + n, head=prefix), prefix_len + n, out)
        for n, out in zip(input_lens, output_lens, strict=True)
    ]

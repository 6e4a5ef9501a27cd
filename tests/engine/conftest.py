"""Fixtures for engine tests: the real default model, and transformers' greedy outputs as reference."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdserve.models.prepare import resolve_model

PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "List three colors:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning "
    "walked down to the harbour before sunrise. One day he found",
    "Q: What is 12 times 7?\nA:",
    "Translate to French: I like apples.",
    "Hi",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Why",
    "Écris une phrase en français sur le café ☕ et",
    "import numpy as np\nx = np.arange(10)\nprint(",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain gravity."}],
]
MAX_NEW = 24


@pytest.fixture(scope="session")
def model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(p) for p in PROMPTS]
    for chat in CHATS:
        out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return ids


@pytest.fixture(scope="session")
def hf_greedy(model_dir, prompt_ids, tmp_path_factory) -> list[list[int]]:
    """transformers' generate(do_sample=False), float32, CPU, one prompt at a time. Computed once per
    run: under pytest-xdist the first worker that needs it writes it where the others read it (the
    workers' temporary directories share a parent), behind a file lock."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _hf_greedy(model_dir, prompt_ids)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "hf_greedy.json"
    key = {"model": model_dir, "prompts": prompt_ids, "max_new": MAX_NEW}
    with FileLock(f"{shared}.lock"):
        if shared.is_file():
            cached = json.loads(shared.read_text())
            if cached["key"] == key:
                return list(cached["outs"])
        outs = _hf_greedy(model_dir, prompt_ids)
        shared.write_text(json.dumps({"key": key, "outs": outs}))
    return outs


def _hf_greedy(model_dir: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False)
            outs.append(y[0, len(ids) :].tolist())
    return outs

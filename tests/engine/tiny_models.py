"""Small random-weight models of each architecture, with a tokenizer trained on the spot, saved as an
ordinary Hugging Face directory: what the GPU, transport and tensor-parallel tests run without a
checkpoint or a download. Also the two greedy runs those tests compare: transformers' and the engine's."""

from __future__ import annotations

from typing import Any

import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill is compute-bound; decode is bound by memory bandwidth.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention keeps the KV cache in fixed-size blocks.",
] * 8
BASE = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
)  # fmt: skip


def train_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def save_tiny_model(path: str, model_type: str = "llama", **overrides: Any) -> str:
    """Write a float32 random-weight model of `model_type` (BASE shape, then `overrides`) into `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = train_tokenizer(path)
    cfg = AutoConfig.for_model(model_type, **{**BASE, "eos_token_id": tok.eos_token_id, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so greedy paths differ per prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path


def hf_greedy_ids(model: Any, prompts: list[list[int]], max_new_tokens: int = 16) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, on the model's device (no TF32: float32 means it)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    device = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def engine_greedy(
    model_dir: str, prompts: list[list[int]], max_tokens: int = 16, **options: Any
) -> list[list[int]]:
    """The engine's greedy tokens (float32, 128 blocks, `options`); its pool must be free afterwards."""
    from pdserve import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", num_blocks=128, **options)
    try:
        out = [
            c.token_ids
            for c in llm.generate_ids(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        ]
        assert llm.check_pool_free()
        return out
    finally:
        llm.close()


def handed_off_output(prefill: Any, decode: Any, prompt: list[int], max_tokens: int = 12) -> Any:
    """Step a prefill and a decode Engine (inproc KV) on one greedy request handed from one to the
    other until it ends; its last output (finished, or an error such as a refused handshake)."""
    from pdserve import SamplingParams
    from pdserve.disagg.handoff import FromPrefill

    assert prefill.connector and decode.connector
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    decode.add_request("r", prompt, params, FromPrefill(prefill.connector.address))
    outs = []
    for _ in range(500):
        for e in (decode, prefill):
            outs.extend(o for o in e.step() if o.request_id == "r")
        if outs and outs[-1].finished:
            break
    return outs[-1]

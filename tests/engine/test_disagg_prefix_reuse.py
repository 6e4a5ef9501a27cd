"""Decode-side prefix reuse, with the real model over the tcp transport in one process: a decode
instance that caches a prefix of the prompt (turn 1 of a conversation) reserves and receives only the
blocks after it, and the output stays token-identical to colocated serving and to transformers."""

from __future__ import annotations

import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.block_manager import cdiv
from pdserve.server.metrics import ServerMetrics
from tests.e2e.cluster import metric

MAX_NEW = 8  # enough tokens to see outputs diverge; each one costs on a CPU
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
SYSTEM = "You are a physics teacher. Answer briefly, in plain words, without formulas or lists."
NEXT_TURN = "<|im_end|>\n<|im_start|>user\nNow say it in one sentence.<|im_end|>\n<|im_start|>assistant\n"


def _transformers_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False)
            outs.append(y[0, len(ids) :].tolist())
    return outs


class _Turns:
    """One request at a time through the disaggregated LLM, with what its decode instance received."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.decode = llm.engines[0]
        assert self.decode.connector is not None
        self.connector = self.decode.connector
        self.bs = self.decode.block_manager.block_size

    def run(self, prompt: list[int]) -> tuple[list[int], int, int]:
        """(output, KV bytes received, prompt tokens reused from the decode instance's cache)."""
        got, reused = self.connector.bytes_received, self.decode.stats().kv_reused_tokens
        [c] = self.llm.generate_ids([prompt], GREEDY)
        assert c.error is None, c.error
        return c.token_ids, self.connector.bytes_received - got, self.decode.stats().kv_reused_tokens - reused


def _chat(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]


def test_a_second_turn_receives_only_the_blocks_the_decode_instance_lacks(model_dir, tokenizer):
    llm = LLM(model_dir, num_blocks=256, prefill=1, decode=1, kv_transport="tcp")
    try:
        t = _Turns(llm)
        bs, block_bytes = t.bs, t.connector.block_bytes
        turn1 = _chat(tokenizer, "Why does the Moon not fall onto the Earth?")
        out1, got1, reused1 = t.run(turn1)
        assert reused1 == 0 and got1 == cdiv(len(turn1), bs) * block_bytes
        turn2 = turn1 + out1 + tokenizer.encode(NEXT_TURN)
        out2, got2, reused2 = t.run(turn2)
        cached = (len(turn1) + len(out1) - 1) // bs  # turn 1's computed tokens (its last token never ran)
        assert cached >= 2 and reused2 == cached * bs
        assert got2 == (cdiv(len(turn2), bs) - cached) * block_bytes, "turn 2 received blocks it had"
        t.decode.block_manager.reset_prefix_cache()  # the path without reuse: the same tokens
        out2_whole, got2_whole, reused = t.run(turn2)
        assert (out2_whole, got2_whole, reused) == (out2, cdiv(len(turn2), bs) * block_bytes, 0)
        whole = turn2[: len(turn2) // bs * bs]  # every block cached: the last one still comes
        out3, got3, reused3 = t.run(whole)
        assert (got3, reused3) == (block_bytes, len(whole) - bs)
        assert all(e.num_prefill_tokens == 0 for e in llm.engines), "the decode instance ran a prompt"
        assert llm.check_pool_free()
        metrics = ServerMetrics()
        metrics.set_engine_stats(t.decode.stats())
        reused_total = reused2 + reused3
        assert metric(metrics.render().decode(), "pdserve_kv_reused_tokens_total") == reused_total
    finally:
        llm.close()
    colocated = LLM(model_dir, num_blocks=256)
    try:
        expected = [c.token_ids for c in colocated.generate_ids([turn1], GREEDY)]
        expected += [colocated.generate_ids([p], GREEDY)[0].token_ids for p in (turn2, whole)]
    finally:
        colocated.close()
    assert [out1, out2, out3] == expected == _transformers_greedy(model_dir, [turn1, turn2, whole])

"""Qwen2 / Qwen2.5 / QwQ: the Llama decoder with biases on the q, k and v projections."""

from __future__ import annotations

from pdserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True

"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.qwen2 import Qwen2ForCausalLM
from pdserve.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    by_type = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}
    model_type = getattr(hf_config, "model_type", "")
    if model_type in by_type:
        return by_type[model_type]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)} ({model_type!r}); "
        f"supported: {', '.join(MODELS)}"
    )

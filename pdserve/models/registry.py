"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from pdserve.models.ernie4_5 import Ernie4_5_MoeForCausalLM, Ernie4_5ForCausalLM
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.qwen2 import Qwen2ForCausalLM
from pdserve.models.qwen2_moe import Qwen2MoeForCausalLM
from pdserve.models.qwen3 import Qwen3ForCausalLM
from pdserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Ernie4_5ForCausalLM": Ernie4_5ForCausalLM,
    "Ernie4_5_ForCausalLM": Ernie4_5ForCausalLM,  # the name in Baidu's own -PT configs
    "Ernie4_5_MoeForCausalLM": Ernie4_5_MoeForCausalLM,
}
BY_MODEL_TYPE: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "ernie4_5": Ernie4_5ForCausalLM,
    "ernie4_5_moe": Ernie4_5_MoeForCausalLM,
}


def model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    model_type = getattr(hf_config, "model_type", "")
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)} ({model_type!r}); "
        f"supported: {', '.join(MODELS)}"
    )

"""pdserve: prefill/decode disaggregated LLM serving.

The public offline API is `LLM` and `SamplingParams`; everything else is reached through the CLI.
Imports are lazy so that `pdserve --help` and light modules start fast.
"""

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)

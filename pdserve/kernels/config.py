"""KernelConfig: which implementation runs each model operation, decided once per model runner.

Every operation has a torch reference (any device) and, on CUDA, a Triton implementation. The choice
is made when the model runner is built, from this frozen config, never from the environment or from
module globals at call time. The defaults are what the benchmarks in docs/performance.md measured as
fastest; each switch exists so that an A/B (benchmarks/gpu_engine.py --kernels) or a user hitting a
problem can turn one path off without touching code.

    pdserve serve --kernels pdl=off,split_norm=off
    LLM(..., kernels=KernelConfig(pdl=False))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields, replace
from typing import Any

ATTENTION_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class KernelConfig:
    """Kernel choices for one engine. `triton=None` means: Triton on CUDA when it is installed."""

    triton: bool | None = None  # the Triton implementations at all (False: torch everywhere)
    attention: str = "auto"  # auto | triton | torch (triton on CPU only under TRITON_INTERPRET=1)
    skinny_gemm: bool = True  # weight-streaming GEMM for projections at few rows of x
    gated_rows: bool = True  # gate_up with SiLU * up in the skinny GEMM's epilogue where tuned
    split_norm: bool = True  # down_proj as K-split partials reduced by the next add-RMSNorm
    pdl: bool = True  # programmatic dependent launch for the decode step's kernels (sm_90+)
    decode_rotary: bool = True  # decode-only steps: rotary + KV write folded into decode attention
    truncating_sampler: bool = True  # top-k/top-p rows through the Triton search instead of a sort
    tuning: str = "auto"  # tile tables: auto (by device family) or a path to a tuning JSON file

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            choices = ", ".join(ATTENTION_BACKENDS)
            raise ValueError(f"attention must be one of {choices}, got {self.attention!r}")

    @classmethod
    def parse(cls, spec: str, base: KernelConfig | None = None) -> KernelConfig:
        """`name=value,...` (booleans as on/off, true/false, 1/0) over `base` or the defaults."""
        config = base or cls()
        known = {f.name: f for f in fields(cls)}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                names = ", ".join(known)
                raise ValueError(f"kernel option {item!r}: expected name=value, name one of {names}")
            changes: dict[str, Any] = {name: _value(name, value.strip(), known[name].type)}
            config = replace(config, **changes)
        return config

    def resolved(self, device_type: str) -> KernelConfig:
        """This config with `triton` decided for a device of `device_type` ("cuda", "cpu")."""
        if self.triton is not None:
            return self
        return replace(self, triton=device_type == "cuda" and importlib.util.find_spec("triton") is not None)


def _value(name: str, text: str, annotation: object) -> bool | str | None:
    if annotation == "str":
        return text
    lowered = text.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    if lowered in ("auto", "none") and annotation == "bool | None":
        return None
    raise ValueError(f"kernel option {name}: {text!r} is not on/off")

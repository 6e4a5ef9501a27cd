"""Whether a decode instance and a prefill instance may exchange KV: what the handshake compares.

Both sides describe themselves by the same dict (engine.py builds it): the pool's shape and dtype,
the weights' quantization, since KV computed by a differently quantized model is not the KV this
decode instance would have computed, and an fp8 pool's per-layer scales (a digest of them,
engine/kv_scales.py), since the decode instance reads the prefill's bytes with its own scales.
A mismatch is refused naming what differs and the flag to fix.
"""

from __future__ import annotations

from typing import Any

# layout key -> (what it is, the flag both roles must agree on)
_NAMED = {
    "quantization": ("weight quantization", "--quantization"),
    "dtype": ("KV cache dtype", "--dtype and --kv-cache-dtype"),
    "kv_scales": (
        "fp8 KV cache scales (digest)",
        "--kv-scales-file (or the same checkpoint and weights, whose scales are calibrated at load)",
    ),
}


def layout_mismatch(decode: dict[str, Any], prefill: dict[str, Any]) -> str:
    """Why the two layouts cannot exchange KV ("" when they can)."""
    if decode == prefill:
        return ""
    for key, (what, flag) in _NAMED.items():
        if decode.get(key) != prefill.get(key):
            return (
                f"{what} mismatch: decode runs {decode.get(key)}, prefill runs {prefill.get(key)} "
                f"(both roles need the same {flag})"
            )
    return f"KV layout mismatch: decode {decode}, prefill {prefill}"

"""Where the Triton kernel tests run: on the GPU when there is one, else under Triton's interpreter.

TRITON_INTERPRET=1 is read when a kernel is defined, so a test module imports this before any kernel
module. bf16 cases are GPU-only: triton 3.6's interpreter truncates fp32 -> bf16 where the GPU rounds.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if CUDA else "cpu")

gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]  # large cases
BF16 = pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="the interpreter truncates to bf16"), id="bf16"
)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]


def fix_interpreter() -> None:
    """triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses (triton#9171)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "pdserve_fixed", False):
        return

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    patched.pdserve_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def by_device(cpu: int, gpu: int) -> int:
    """A test's size: `cpu` under the interpreter (each program runs in Python), `gpu` on CUDA."""
    return gpu if CUDA else cpu

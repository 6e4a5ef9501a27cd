"""Where the Triton kernel tests run: on the GPU when there is one, else under Triton's interpreter.

TRITON_INTERPRET=1 is read when a kernel is defined, so a test module imports this before any kernel
module. bf16 cases are GPU-only: triton 3.6's interpreter truncates fp32 -> bf16 where the GPU rounds.
The interpreter is slow: `grid` gives a test a smaller set of cases on CPU (each behaviour still
covered once) and the full set under `make test-gpu`. `build` gives the kernels a KernelConfig chooses.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pdserve.kernels.config import KernelConfig  # these import no triton: the interpreter switch below
from pdserve.kernels.factory import build_kernels  # still comes before any kernel is defined
from pdserve.kernels.ops import Kernels
from pdserve.kernels.tuning.tables import Tuning, tuning_for

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


def interpreted_or_skip(kernel: object) -> None:
    """For a test file's autouse fixture: on CPU, skip unless `kernel` runs under the interpreter
    (its module was imported after TRITON_INTERPRET=1 was set), then ready the interpreter; on CUDA
    nothing."""
    if CUDA:
        return
    if type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("the kernel was defined before TRITON_INTERPRET=1 was set")
    fix_interpreter()


def grid(cpu: list, full: list) -> list:  # type: ignore[type-arg]
    """Test cases: the smaller `cpu` list under the interpreter (slow), the `full` one on a GPU."""
    return full if CUDA else cpu


def hopper_tuning() -> Tuning:
    """The tuning tables the engine loads on this machine's device (hopper.json on CPU too)."""
    return tuning_for("auto", DEVICE)


def build(**options: object) -> Kernels:
    """The model's kernels for DEVICE as KernelConfig(**options) chooses them (Triton on CPU only where
    a test asks for it, e.g. attention="triton", which then runs under the interpreter)."""
    return build_kernels(KernelConfig(**options), DEVICE)  # type: ignore[arg-type]


def by_device(cpu: int, gpu: int) -> int:
    """A test's size: `cpu` under the interpreter (each program runs in Python), `gpu` on CUDA."""
    return gpu if CUDA else cpu

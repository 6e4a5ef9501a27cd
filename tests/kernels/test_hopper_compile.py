"""The sampler kernels compile for Hopper (sm_90: Triton to PTX, then ptxas) on a machine without a
GPU, without register spills: the interpreter tests check what they compute, this checks that the GPU
compiler takes them (loop-carried types, scalar branches), before a lent GPU's time is spent on it.

Runs in a child process: the test package switches Triton to its interpreter, whose kernels cannot be
compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .triton_env import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

COMPILE = r"""
import json, os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.layers import triton_sampler, triton_truncated

common = {"logits_ptr": "*bf16", "stride_row": "i32", "out_ptr": "*i64", "seed": "i32"}
kernels = {
    "sample": (triton_sampler._sample_kernel, {**common, "inv_temp_ptr": "*fp32"},
               {"VOCAB": 152064, "BLOCK": 4096}),
    "truncated": (triton_truncated._truncated_kernel, {**common, "params_ptr": "*fp32", "rows": "i32"},
                  {"VOCAB": 152064, "BLOCK": 1024, "CUTS": 16, "MAX_PASSES": 12}),
}
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
report = {}
for name, (fn, sig, consts) in kernels.items():
    names = fn.arg_names
    signature = {a: sig.get(a, "constexpr") for a in names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        open(ptx, "w").write(compiled.asm["ptx"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    report[name] = info
print(json.dumps(report))
"""


def test_sampler_kernels_compile_for_hopper_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    if "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this triton build ships no ptxas")
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {"sample", "truncated"}
    for name, info in report.items():
        assert "0 bytes spill stores" in info, (name, info)

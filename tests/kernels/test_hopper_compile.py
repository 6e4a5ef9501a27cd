"""Every Triton kernel compiles for Hopper (sm_90: Triton to PTX, then ptxas) on a machine without a
GPU, without register spills, at the Qwen2.5-7B shapes (bf16): the interpreter tests check what the
kernels compute, this checks that the GPU compiler takes them (loop-carried types, scalar branches,
constexpr use) before a lent GPU's time is spent finding out.

Runs in a child process: the test package switches Triton to its interpreter, whose kernels cannot be
compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .triton_env import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# name: (module, kernel, {argument: type} (other arguments: i32), constexprs, num_warps, num_stages),
# as the launches in pdserve ask (3: Triton's default where a launch does not say); the decode step's
# kernels with PDL on (kernels/pdl.py: griddepcontrol must compile too)
KERNELS = {
    **{f"sample{'_cut' if cut else ''}": (
        "pdserve.kernels.sampling_triton", "_sample_kernel",
        {"logits_ptr": "*bf16", "inv_temp_ptr": "*fp32", "out_ptr": "*i64", "part_score_ptr": "*fp32",
         "part_index_ptr": "*i32", "state_f_ptr": "*fp32", "state_k_ptr": "*i64"},
        {"VOCAB": 152064, "BLOCK": 1024, "SINGLE_CHUNK": False, "HAS_CUT": cut, "PDL": True}, 4, 3)
        for cut in (False, True)},
    "cut_stats": ("pdserve.kernels.truncation_triton", "_stats_kernel",
                  {"logits_ptr": "*bf16", "params_ptr": "*fp32", "part_f_ptr": "*fp32", "part_k_ptr": "*i64"},
                  {"VOCAB": 152064, "BLOCK": 1024}, 4, 3),
    **{f"cut_count_{dtype[1:]}": (
        "pdserve.kernels.truncation_triton", "_count_kernel",
        {"logits_ptr": dtype, "params_ptr": "*fp32", "part_f_ptr": "*fp32", "part_k_ptr": "*i64",
         "state_f_ptr": "*fp32", "state_k_ptr": "*i64", "part_mass_ptr": "*fp32", "part_count_ptr": "*i32"},
        {"VOCAB": 152064, "BLOCK": 128, "BLOCK_C": 16, "CUTS": 16, "TOP_P": True, "TOP_K": True}, 4, 3)
        for dtype in ("*bf16", "*fp32")},
    "cut_finish": ("pdserve.kernels.truncation_triton", "_finish_kernel",
                   {"params_ptr": "*fp32", "part_f_ptr": "*fp32", "part_k_ptr": "*i64",
                    "state_f_ptr": "*fp32", "state_k_ptr": "*i64", "part_mass_ptr": "*fp32",
                    "part_count_ptr": "*i32"},
                   {"VOCAB": 152064, "BLOCK_C": 16, "CUTS": 16, "TOP_P": True, "TOP_K": True}, 4, 3),
    "sample_pick": ("pdserve.kernels.sampling_triton", "_pick_chunk_kernel",
                    {"part_score_ptr": "*fp32", "part_index_ptr": "*i32", "out_ptr": "*i64"},
                    {"BLOCK_C": 64, "PDL": True}, 1, 3),
    "rotary": ("pdserve.kernels.triton_rotary", "_rotary_kernel",
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32",
                "sin_ptr": "*fp32"},
               {"NUM_Q_HEADS": 28, "NUM_K_HEADS": 4, "HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64}, 4, 3),
    **{  # Qwen2.5-7B; Qwen3-8B with its q/k norms
        f"rotary_store{'_qk_norm' if norm else ''}": (
            "pdserve.kernels.triton_rotary", "_rotary_store_kernel",
            {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32",
             "sin_ptr": "*fp32", "slot_ptr": "*i64", "cache_ptr": "*bf16", "qw_ptr": "*bf16",
             "kw_ptr": "*bf16", "eps": "fp32", "k_inv_scale": "fp32", "v_inv_scale": "fp32"},
            {"NUM_Q_HEADS": q_heads, "NUM_K_HEADS": kv_heads, "HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64,
             "BLOCK_SIZE": 16, "NORM": norm, "PDL": True}, 4, 3)
        for q_heads, kv_heads, norm in [(28, 4, False), (32, 8, True)]
    },
    **{  # the skinny GEMM's tiles plan() and the tuning's gated_tiles pick (BLOCK_M, BLOCK_N, BLOCK_K,
        # stages), plain and gated (BLOCK_N: gate columns only)
        f"skinny_gemm_{m}x{n}x{k}x{stages}x{warps}{'_gated' if gated else ''}": (
            "pdserve.kernels.triton_skinny", "_skinny_kernel",
            {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"},
            {"HAS_BIAS": False, "GATED": gated, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PDL": True},
            warps, stages)
        for m, n, k, stages, warps, gated in [
            (16, 32, 512, 4, 4, False), (32, 32, 512, 4, 4, False), (16, 32, 256, 4, 4, False),
            (16, 64, 256, 4, 4, False), (16, 32, 256, 4, 4, True), (32, 64, 64, 3, 4, True),
            (64, 32, 64, 4, 4, True), (64, 64, 64, 4, 4, True), (32, 128, 128, 3, 8, True),
            (64, 64, 128, 4, 4, True)]
    },
    "rms_norm": ("pdserve.kernels.triton_fused", "_rms_norm_kernel",
                 {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                  "res_out_ptr": "*bf16", "eps": "fp32"},
                 {"BLOCK": 4096, "HAS_RESIDUAL": True, "PARTS": 0, "PDL": True}, 8, 3),
    "rms_norm_parts": ("pdserve.kernels.triton_fused", "_rms_norm_kernel",  # split_k.Partials reduced
                       {"x_ptr": "*fp32", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
                        "res_out_ptr": "*bf16", "eps": "fp32"},
                       {"BLOCK": 4096, "HAS_RESIDUAL": True, "PARTS": 2, "PDL": True}, 8, 3),
    "silu_mul": ("pdserve.kernels.triton_fused", "_silu_mul_kernel",
                 {"x_ptr": "*bf16", "out_ptr": "*bf16"}, {"BLOCK": 1024, "PDL": True}, 4, 3),
    "store_kv": ("pdserve.kernels.attention.triton_cache", "_store_kv_kernel",
                 {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*bf16", "slot_ptr": "*i64",
                  "k_inv_scale": "fp32", "v_inv_scale": "fp32"},
                 {"NUM_KV_HEADS": 4, "HEAD_DIM": 128, "BLOCK_H": 4, "BLOCK_D": 128, "BLOCK_SIZE": 16}, 4, 3),
    **{  # plain; with the new token rotated, stored and attended inside (triton_new_token), Qwen3's norms
        f"decode_split{suffix}": (
            "pdserve.kernels.attention.triton_decode", "_decode_split_kernel",
            {"q_ptr": "*bf16", "cache_ptr": "*bf16", "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64",
             "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "scale_log2": "fp32",
             "v_scale": "fp32", "k_inv_scale": "fp32", "v_inv_scale": "fp32",
             "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
             "slot_ptr": "*i64", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "eps": "fp32"},
            {"QUERY_GROUP": 7, "HEAD_DIM": 128, "BLOCK_G": 16, "BLOCK_D": 128, "BLOCK_N": 64,
             "BLOCK_SIZE": 16, "SINGLE_SPLIT": False, "DOT_PRECISION": "tf32", "NEW_TOKEN": new, "HALF": 64,
             "NORM": norm, "PDL": True}, 4, 2)
        for suffix, new, norm in [("", False, False), ("_new", True, False), ("_new_qk_norm", True, True)]
    },
    "decode_reduce": ("pdserve.kernels.attention.triton_decode", "_decode_reduce_kernel",
                      {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16"},
                      {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_SPLITS": 8, "PDL": True}, 4, 3),
    "prefill": ("pdserve.kernels.attention.triton_prefill", "_prefill_kernel",
                {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i64",
                 "seq_lens_ptr": "*i64", "query_start_ptr": "*i32", "scale_log2": "fp32", "v_scale": "fp32"},
                {"QUERY_GROUP": 7, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_N": 64,
                 "BLOCK_SIZE": 16, "DOT_PRECISION": "tf32"}, 4, 2),
}  # fmt: skip


def _quantized_gemms() -> dict[str, tuple]:  # type: ignore[type-arg]
    """The quantized GEMMs (triton_wquant*.py) with the tiles plan() gives the 7B shapes at 1, 16 and
    128 rows (one row: the CUDA-core form), split or not; the tile and dequantize kernels. (Not checked
    here: whether a tile's weight loads are pipelined, see triton_wquant_plan.prefetch.)"""
    from pdserve.kernels.triton_wquant_plan import FORMATS, GROUP, plan

    wtype = {"wint8": "*i8", "wint4": "*i8", "fp8": "*fp8e4nv"}
    kernels: dict[str, tuple] = {}  # type: ignore[type-arg]
    for fmt in FORMATS:
        for n, k in [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]:
            for rows in (1, 16, 128):
                p = plan(fmt, n, k, rows, 132)
                split = -(-k // p.span)
                name = (
                    f"wq_skinny_{fmt}_{rows}x{p.block_n}x{p.block_k}x{p.warps}{'_split' if split > 1 else ''}"
                )
                kernels[name] = (
                    "pdserve.kernels.triton_wquant_skinny",
                    "_wq_skinny_kernel",
                    {
                        "x_ptr": "*bf16",
                        "w_ptr": wtype[fmt],
                        "s_ptr": "*fp32",
                        "b_ptr": "*bf16",
                        "y_ptr": "*fp32" if split > 1 else "*bf16",
                    },
                    {
                        "FMT": FORMATS.index(fmt),
                        "GROUP": GROUP,
                        "HAS_BIAS": split == 1,
                        "PARTIALS": split > 1,
                        "DOT": p.dot,
                        "BLOCK_M": max(16, rows),
                        "BLOCK_N": p.block_n,
                        "BLOCK_K": p.block_k,
                        "PRECISION": "tf32",
                        "PREFETCH": p.prefetch,
                    },
                    p.warps,
                    p.stages,
                )
    kernels["wq_reduce"] = (
        "pdserve.kernels.triton_wquant_skinny",
        "_reduce_kernel",
        {"p_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"},
        {"HAS_BIAS": True, "BLOCK": 1024},
        4,
        3,
    )
    for fmt in ("wint8", "wint4"):
        kernels[f"wq_tiles_{fmt}"] = (
            "pdserve.kernels.triton_wquant",
            "_wquant_kernel",
            {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"},
            {
                "FMT": FORMATS.index(fmt),
                "GROUP": GROUP,
                "HAS_BIAS": False,
                "BLOCK_M": 128,
                "BLOCK_N": 128,
                "BLOCK_K": 64,
                "PRECISION": "tf32",
            },
            8,
            3,
        )
        kernels[f"wq_dequantize_{fmt}"] = (
            "pdserve.kernels.triton_wquant",
            "_dequantize_kernel",
            {"w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*bf16"},
            {"FMT": FORMATS.index(fmt), "GROUP": GROUP, "BLOCK_N": 32, "BLOCK_K": 256},
            4,
            3,
        )
    return kernels  # fmt: skip


KERNELS.update(_quantized_gemms())

COMPILE = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernels = json.loads(sys.argv[1])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
report = {}
for name, (module, kernel, types, consts, warps, stages) in kernels.items():
    fn = getattr(importlib.import_module(module), kernel)
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    # as a launch specializes: pointers and (specializable) integers divisible by 16
    aligned = [i for i, p in enumerate(fn.params) if signature[p.name] != "constexpr"
               and (signature[p.name].startswith("*") or signature[p.name] == "i32")
               and not p.do_not_specialize and not p.do_not_specialize_on_alignment]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "k.ptx"), "w").write(ptx)
        cmd = [ptxas, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")]
        info = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        report[name] = {"ptxas": info, "waits": "griddepcontrol.wait" in ptx}
print(json.dumps(report))
"""


def test_every_kernel_compiles_for_hopper_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(KERNELS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(KERNELS)
    for name, info in report.items():
        assert " 0 bytes spill stores" in info["ptxas"], (name, info)
        assert info["waits"] == KERNELS[name][3].get("PDL", False), name  # PDL on: waits for the prior

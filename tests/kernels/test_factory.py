"""build_kernels: the model's operations chosen once from a KernelConfig, the attention backend they
imply, the tuning tables they read, and that choosing torch never imports triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pdserve.kernels import linear, norm
from pdserve.kernels.config import KernelConfig
from pdserve.kernels.factory import build_kernels, uses_triton_attention
from pdserve.kernels.tuning.tables import HERE, load, tuning_for
from pdserve.layers.attention.registry import backend_class
from pdserve.layers.attention.torch_backend import TorchAttentionBackend

from .triton_env import HAS_TRITON


def test_the_cpu_default_is_torch_everywhere() -> None:
    kernels = build_kernels(KernelConfig(), torch.device("cpu"))
    assert kernels.config.triton is False
    assert kernels.rms_norm is norm.rms_norm and kernels.linear is linear.linear
    assert kernels.rotary is None and kernels.attention is None
    assert backend_class(kernels) is TorchAttentionBackend


def test_attention_choice_on_cuda() -> None:
    """auto: Triton attention wherever Triton is chosen; torch: never; an unknown name: refused."""
    assert uses_triton_attention(KernelConfig().resolved("cuda")) is HAS_TRITON
    assert not uses_triton_attention(KernelConfig(attention="torch").resolved("cuda"))
    assert not uses_triton_attention(KernelConfig(triton=False).resolved("cuda"))
    with pytest.raises(ValueError):
        KernelConfig(attention="flash")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_attention_on_cpu_takes_the_tuned_decode_limits() -> None:
    kernels = build_kernels(KernelConfig(attention="triton", decode_rotary=False), torch.device("cpu"))
    assert kernels.attention is not None and not kernels.attention.decode_rotary
    assert backend_class(kernels).__name__ == "TritonAttentionBackend"
    assert kernels.attention.num_splits.keywords == {"max_splits": 64, "min_tokens": 64}  # type: ignore[attr-defined]


def test_without_triton_cuda_falls_back_to_torch() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from pdserve.kernels.config import KernelConfig\n"
        "from pdserve.kernels.factory import uses_triton_attention\n"
        "import pdserve.layers.attention.registry\n"
        "config = KernelConfig().resolved('cuda')\n"
        "assert config.triton is False and not uses_triton_attention(config)\n"
        "try:\n"
        "    uses_triton_attention(KernelConfig(attention='triton'))\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('attention=triton without triton must be refused')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_cpu_model_never_imports_triton() -> None:
    code = (
        "import sys, torch\n"
        "from pdserve.kernels.config import KernelConfig\n"
        "from pdserve.kernels.factory import build_kernels\n"
        "from pdserve.models.llama import LlamaForCausalLM\n"
        "from pdserve.engine.model_runner import ModelRunner\n"
        "build_kernels(KernelConfig(), torch.device('cpu'))\n"
        "assert not [m for m in sys.modules if m == 'triton' or m.startswith('triton.')], 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_tuning_tables_hold_the_measured_values() -> None:
    """hopper.json, loaded for the CPU and for every family without its own file, holds the values the
    kernels were tuned with (an edit that changes one is a tuning change, not a refactor)."""
    t = tuning_for("auto", torch.device("cpu"))
    assert t.family == "hopper"
    s = t.skinny
    assert (s.max_rows, s.min_weight, s.widths, s.min_wave_fill) == (32, 12_000_000, (32, 64), 0.8)
    assert (s.one_wave, s.many_waves, s.fused_min_width, s.gated_rows) == ((512, 4), (256, 4), 64, (17, 64))
    assert s.gated_tiles[(37888, 3584)] == ((32, (128, 64, 3, 4)), (48, None), (64, (64, 64, 4, 4)))
    assert s.gated_tiles[(28672, 4096)] == ((32, None), (64, (128, 128, 4, 4)))
    assert t.split_k[(3584, 18944)] == ((72, 256, 2),) and t.split_k[(5120, 27648)] == ((72, 128, 2),)
    assert (t.pdl_max_rows, t.pdl_attention_max_rows) == (None, 64)
    assert (t.decode_max_splits, t.decode_min_split_tokens) == (64, 64)
    a = t.attention
    assert (a.prefill_tile(torch.float32, 256), a.prefill_tile(torch.bfloat16, 256)) == (
        (32, 32, 4, 2),
        (64, 32, 4, 2),
    )
    assert a.prefill_tile(torch.float16, 128) == (64, 64, 4, 2)
    assert (a.decode_tile(torch.float32), a.decode_tile(torch.bfloat16)) == ((32, 4, 2), (64, 4, 2))


def test_a_tuning_path_picks_that_file(tmp_path: Path) -> None:
    data = json.loads((HERE / "hopper.json").read_text())
    data["family"], data["pdl"]["attention_max_rows"] = "mine", 32
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    kernels = build_kernels(KernelConfig(tuning=str(path), attention="torch"), torch.device("cpu"))
    assert kernels.config.tuning == str(path)
    assert load(str(path)).pdl_attention_max_rows == 32
    assert tuning_for(str(path), torch.device("cpu")).family == "mine"

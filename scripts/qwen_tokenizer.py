"""A tokenizer with Qwen2/Qwen2.5's vocabulary, for benchmarks where the vocabulary itself matters
(grammar masks), on machines that cannot download one.

Qwen's byte-level BPE (151,643 ranks) is public inside the `dashscope` wheel (resources/qwen.tiktoken);
Qwen2 and Qwen2.5 use the same ranks with the same pre-tokenizer pattern, then 22 special tokens
(ids 151643-151664, <|im_end|> = 151645, <tool_call> = 151657). This rebuilds that tokenizer as a
Hugging Face tokenizer.json: same ids, same text in and out, so a grammar engine sees the token
strings a Qwen2.5 server sees. Without it, dummy-weight Qwen shapes run with the default model's
49,152-token tokenizer padded to the model's 152,064 logits, which is not what a Qwen server masks.

    python scripts/qwen_tokenizer.py OUT_DIR [--tiktoken PATH]   # default: pip download dashscope
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


def ranks(path: Path) -> dict[bytes, int]:
    lines = path.read_bytes().splitlines()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}


def fetch_tiktoken(workdir: Path) -> Path:
    """qwen.tiktoken out of the dashscope wheel (pip download: the registry is reachable)."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), "dashscope"]
    subprocess.run(pip, check=True)
    wheel = next(workdir.glob("dashscope-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith("qwen.tiktoken"))
        z.extract(name, workdir)
    return workdir / name


def build(tiktoken: Path, out: Path) -> int:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, url: str) -> dict[bytes, int]:  # type: ignore[override]
            return ranks(Path(url))  # the converter's own reader needs the tiktoken package

    backend = Converter(vocab_file=str(tiktoken), pattern=PATTERN).converted()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    ids = fast.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<tool_call>"])
    assert ids == [151643, 151645, 151657], ids
    fast.save_pretrained(str(out))
    return len(fast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tiktoken", default=None, help="qwen.tiktoken (default: fetched from dashscope)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.tiktoken) if args.tiktoken else fetch_tiktoken(Path(tmp))
        size = build(source, Path(args.out))
    print(f"{args.out}: {size} tokens")


if __name__ == "__main__":
    main()

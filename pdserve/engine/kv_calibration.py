"""The calibration run behind an fp8 KV cache's scales: a fixed English text through the model once, at
load, and the largest |K| and |V| each attention layer wrote.

The text is part of pdserve (CALIBRATION_TEXT), tokenized with the model's tokenizer, so the same
weights give the same scales on every instance: a prefill instance writes KV that a decode instance
reads with its own scales, and both must have computed the same ones. A model whose tokenizer cannot
be loaded (or whose vocabulary is smaller than the tokenizer's) is fed fixed token ids instead.

The run writes into a temporary pool of the model's dtype, through the layers' own attention backends
(their scales still 1), so the maxima are of exactly what the fp8 pool will hold: keys after q/k norms
and rotary. This module knows nothing of where the scales go (engine/kv_scales.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pdserve.distributed.group import TPGroup
from pdserve.kv_layout import allocate_kv_pool
from pdserve.layers.attention.metadata import one_prompt

logger = logging.getLogger(__name__)

# ~330 tokens of plain English prose, written for pdserve (not the quality benchmark's text)
CALIBRATION_TEXT = """\
The river that runs through the valley is narrow in summer and wide in spring, when the snow on the \
mountains melts and the water rises over the stones. Farmers on both banks have learned to plant late, \
after the flood has passed, and to build their barns on the higher ground behind the orchards. In the \
village there is a stone bridge with three arches, and an old mill whose wheel no longer turns. \
Children fish from the bridge in the evenings, and the baker, who has lived there for forty years, \
says that the fish were bigger when he was young.

Every autumn the village holds a market in the square. Traders come from the towns along the coast \
with cloth, tools, spices and books, and the farmers sell apples, honey, cheese and wool. The market \
opens at dawn and closes when the church bell rings at six. Visitors often ask why the bell rings \
eleven times instead of six; nobody remembers, but the custom is older than the church itself.

Scientists who studied the valley found that its soil holds water unusually well, which explains the \
size of the apples and the thickness of the grass. They measured rainfall, temperature and the depth \
of the river for ten years, wrote three reports, and recommended that the old drainage canals be \
repaired. The repairs took two summers. Since then the spring floods have been smaller, although the \
farmers still plant late, because that is what their parents did.

Questions, numbers and lists appear in ordinary writing too: How many bridges cross the river? \
Four, if you count the railway. What is the distance to the coast? About 37 kilometres, or 23 miles. \
The recipe for the village's apple cake asks for 500 g of flour, 3 eggs, 200 ml of milk and a pinch \
of salt, baked for 45 minutes at 180 degrees.
"""

NUM_FALLBACK_IDS = 320


def calibration_ids(tokenizer_dir: str | None, vocab_size: int, max_len: int) -> list[int]:
    """CALIBRATION_TEXT in the model's tokens (fixed ids without a usable tokenizer), at most max_len."""
    ids: list[int] | None = None
    if tokenizer_dir is not None:
        try:
            from transformers import AutoTokenizer

            ids = list(AutoTokenizer.from_pretrained(tokenizer_dir).encode(CALIBRATION_TEXT))
        except (OSError, ValueError) as e:
            logger.warning("fp8 KV calibration: no tokenizer in %s (%s); fixed ids", tokenizer_dir, e)
    if not ids or max(ids) >= vocab_size:
        ids = [(i * 7919 + 13) % vocab_size for i in range(NUM_FALLBACK_IDS)]  # spread over the vocabulary
    return ids[:max_len]


@torch.inference_mode()
def kv_amax(
    model: torch.nn.Module, ids: list[int], pool_shape: tuple[int, int, int], dtype: torch.dtype, tp: TPGroup
) -> torch.Tensor:
    """[num_layers, 2] float64 on the CPU: max |K| and max |V| each layer writes for `ids` as one prompt,
    over every KV head (all tensor-parallel ranks: each runs this at the same point of its load).
    pool_shape: (num_layers, this rank's kv heads, head_dim)."""
    layers, kv_heads, head_dim = pool_shape
    device, block_size, t = tp.device, 16, len(ids)
    blocks = -(-t // block_size)
    pool = allocate_kv_pool(layers, blocks, block_size, kv_heads, head_dim, dtype, device)
    positions = torch.arange(t, device=device)
    meta = one_prompt(t, block_size, device)
    model(torch.tensor(ids, device=device), positions, list(pool.unbind(0)), meta)
    amax = pool.abs().float().amax(dim=(2, 3, 4, 5)).double().cpu()  # [layers, 2]; unwritten slots are 0
    return _max_over_ranks(amax, tp)


def _max_over_ranks(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """The elementwise max of x over the ranks, by the group's sum: each rank fills its own row."""
    if tp.size == 1:
        return x
    rows = torch.zeros((tp.size, *x.shape), dtype=x.dtype, device=tp.device)
    rows[tp.rank] = x.to(tp.device)
    return tp.all_reduce(rows).amax(dim=0).cpu()


def model_max_len(hf_config: Any, max_model_len: int | None) -> int:
    """The longest calibration prompt the model takes."""
    limit = int(getattr(hf_config, "max_position_embeddings", 4096))
    return min(limit, max_model_len) if max_model_len else limit

"""How much GPU memory the KV pool may take: `--gpu-memory-utilization` minus what the rest needs.

After the weights are loaded, one forward pass of a full token budget (the largest step the scheduler
can make) plus the logits of a full batch measures the activation peak. The pool gets

    utilization x total memory - memory in use on the device now - (activation peak - allocated now)

"in use on the device" counts other processes too (another instance on the same GPU, the CUDA
context), so two instances sharing a GPU each pass their own share.
"""

from __future__ import annotations

import logging

import torch

from pdserve.layers.attention.metadata import AttentionMetadata
from pdserve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def profile_kv_bytes(
    model: LlamaForCausalLM,
    kv_shape_per_block: tuple[int, ...],  # (layers, 2, block_size, kv_heads, head_dim)
    dtype: torch.dtype,
    device: torch.device,
    max_tokens: int,
    max_seqs: int,
    utilization: float,
) -> int:
    """Bytes the KV pool may take on `device`, measured with one worst-case step."""
    layers, two, block_size, heads, dim = kv_shape_per_block
    blocks = -(-max_tokens // block_size) + 1
    scratch = torch.zeros((layers, two, blocks, block_size, heads, dim), dtype=dtype, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _worst_step(model, list(scratch.unbind(0)), block_size, blocks, device, max_tokens, max_seqs)
    torch.cuda.synchronize(device)
    peak_extra = torch.cuda.max_memory_allocated(device) - before
    del scratch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(utilization * total) - (total - free) - peak_extra
    logger.info(
        "GPU memory: %.1f GiB total, %.1f GiB in use, activation peak %.2f GiB -> KV pool %.1f GiB",
        total / 2**30,
        (total - free) / 2**30,
        peak_extra / 2**30,
        budget / 2**30,
    )
    if budget <= 0:
        raise RuntimeError(
            f"no GPU memory left for the KV cache at --gpu-memory-utilization {utilization}: "
            f"{(total - free) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB in use after loading the model"
        )
    return budget


@torch.inference_mode()
def _worst_step(
    model: LlamaForCausalLM,
    kv_caches: list[torch.Tensor],
    block_size: int,
    blocks: int,
    device: torch.device,
    max_tokens: int,
    max_seqs: int,
) -> None:
    positions = torch.arange(max_tokens, device=device)
    ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
    meta = AttentionMetadata(
        slot_mapping=positions.clone(),
        block_tables=torch.arange(blocks, device=device)[None, :],
        seq_lens=torch.tensor([max_tokens], device=device),
        query_start_loc=[0, max_tokens],
        context_lens=[max_tokens],
        num_decodes=0,
        block_size=block_size,
    )
    hidden = model(ids, positions, kv_caches, meta)
    rows = hidden[-1:].expand(max_seqs, -1).contiguous()
    model.compute_logits(rows).float()

"""The model's weight matrices, each holding this tensor-parallel rank's slice (all of it at tp=1).

    MergedLinear            column-parallel; several checkpoint tensors stacked along the output rows
                            (`qkv_proj` = q, k, v; `gate_up_proj` = gate, up), each cut to the rank's rows
    RowParallelLinear       input columns split (o_proj, down_proj); partial outputs all-reduced, bias once;
                            `forward_partials` may leave a measured down_proj's split-K reduce to the
                            add-RMSNorm after it (kernels/split_k.py)
    VocabParallelEmbedding  vocabulary rows split; rows outside the rank's range give 0, then all-reduce
    ParallelLMHead          vocabulary rows split; the logits' columns are all-gathered

Each sharded parameter carries a ParamShard (pdserve.distributed.weights) saying where it sits in the
full tensor, so checkpoint loading and dummy init cut full tensors the same way. At tp=1 the forward
passes are plain matmuls / F.embedding and no collective runs. The projections multiply through the
model's chosen implementation (`kernels.linear`: F.linear, or on CUDA for a few rows the Triton skinny
GEMM where it was measured faster; kernels/triton_linear.py). With `--quantization` the two parallel
projections swap their float weight for a QuantizedWeight as soon as loading has filled it (`quantize`,
layers/quant.py; models/load_quantize.py) and multiply through quant_linear; a row-parallel shard
scales its rows by the full row's max |w| (gathered over the ranks), so every rank holds its slice of
the tp=1 quantized model; wint4's groups of 128 inputs are the shard's own, the tp=1 groups where the
shard starts on a multiple of 128 (the shipped shapes' shards at TP 2, 4 and 8 all do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.distributed.sharding import split
from pdserve.distributed.weights import ParamShard, copy_full_rows, set_shard
from pdserve.kernels.ops import Kernels
from pdserve.kernels.split_k import Partials
from pdserve.layers.quant import LoadQuantizable, QuantizedWeight, quant_linear, quantize, row_amax

RowSlice = tuple[int, int, int]  # (full rows, first row this rank holds, rows it holds)


class QuantizableLinear(nn.Linear, LoadQuantizable):
    """An nn.Linear whose weight may be replaced by a quantized one (`qweight`) once it is loaded."""

    kernels: Kernels
    qweight: QuantizedWeight | None

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        with self.float_params():
            super().__init__(in_features, out_features, bias=bias)

    def quantize(self, method: str, amax: torch.Tensor | None = None) -> None:
        """Replace the float weight by its `method` form (layers/quant.py); the float one is freed."""
        self.qweight = quantize(self.weight.detach(), method, amax)
        del self.weight
        self.register_parameter("weight", None)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias) with whichever weight this layer holds."""
        if self.qweight is None:
            return self.kernels.linear(x, self.weight, bias)
        return quant_linear(self.kernels, x, self.qweight, bias)


class MergedLinear(QuantizableLinear):
    """Column-parallel nn.Linear with named row ranges, one per checkpoint tensor stacked into it."""

    def __init__(self, in_features: int, shards: dict[str, RowSlice], bias: bool, kernels: Kernels) -> None:
        super().__init__(in_features, sum(size for _, _, size in shards.values()), bias=bias)
        self.kernels = kernels
        self.qweight = None
        self.shards: dict[str, tuple[int, int]] = {}  # name -> (offset, rows) in the full stacked tensor
        segments = []
        full = local = 0
        for name, (rows, start, size) in shards.items():
            self.shards[name] = (full, rows)
            segments.append((full + start, local, size))
            full, local = full + rows, local + size
        for p in (self.weight, self.bias):
            if p is not None:
                set_shard(p, ParamShard((full, *p.shape[1:]), tuple(segments)))

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        self.materialize()
        offset, rows = self.shards[shard]
        target = self.weight if param == "weight" else self.bias
        assert target is not None
        if tensor.shape[0] != rows:
            raise ValueError(f"shard {shard}.{param}: expected {rows} rows, got {tuple(tensor.shape)}")
        copy_full_rows(target, tensor.reshape(rows, -1), offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(x @ gate^T) * (x @ up^T) for this gate_up projection (gate stacked over up, no bias)."""
        if self.qweight is None:
            return self.kernels.silu_mul_linear(x, self.weight)
        return self.kernels.silu_and_mul(self.product(x, None))


class RowParallelLinear(QuantizableLinear):
    """nn.Linear over the input columns [start, start + size) of `in_features`; outputs summed over ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cols: tuple[int, int],
        bias: bool,
        tp: TPGroup,
        kernels: Kernels,
    ) -> None:
        super().__init__(cols[1], out_features, bias=bias)
        self.tp = tp
        self.kernels = kernels
        self.qweight = None
        set_shard(self.weight, ParamShard((out_features, in_features), ((0, 0, out_features),), cols))

    def quantize(self, method: str, amax: torch.Tensor | None = None) -> None:
        if amax is None and self.tp.size > 1 and method != "wint4":  # the full rows' max |w|
            local = row_amax(self.weight.detach())[:, None]  # [N, 1]
            amax = self.tp.all_gather_cols(local, [1] * self.tp.size).amax(dim=1)
        super().quantize(method, amax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.product(x, self.bias)
        y = self.tp.all_reduce(self.product(x, None))
        return y if self.bias is None else y + self.bias

    def forward_partials(self, x: torch.Tensor) -> torch.Tensor | Partials:
        """forward(x), or at tp=1 without a bias, where the tuning's split_k table holds this shape and
        x's row count, its split_k.Partials: for a consumer that sums them (RMSNorm.forward_residual)."""
        whole = self.tp.size > 1 or self.bias is not None or self.qweight is not None
        parts = None if whole else self.kernels.split_products(x, self.weight)
        return self.forward(x) if parts is None else parts


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary range; a token's vector comes from the rank holding it."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        self.vocab_start, size = split(vocab_size, tp.size, tp.rank)
        super().__init__(size, hidden_size)
        self.tp = tp
        set_shard(self.weight, ParamShard((vocab_size, hidden_size), ((self.vocab_start, 0, size),)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """The lm_head rows of this rank's vocabulary range; every rank gets the full [rows, vocab] logits."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup) -> None:
        start, size = split(vocab_size, tp.size, tp.rank)
        super().__init__(hidden_size, size, bias=False)
        self.tp = tp
        self.widths = [split(vocab_size, tp.size, r)[1] for r in range(tp.size)]
        set_shard(self.weight, ParamShard((vocab_size, hidden_size), ((start, 0, size),)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_cols(F.linear(hidden, self.weight), self.widths)

"""The mixture-of-experts block: a router picks each token's top-k experts, those experts (SwiGLU MLPs
stored stacked) run on the tokens routed to them, and an optional shared expert runs on every token.

    x [T, H] -router-> topk_ids [T, K], topk_weights [T, K]
             -experts-> y[t] = sum_k topk_weights[t, k] * down_e(silu(gate_e x[t]) * up_e x[t])
                        with e = topk_ids[t, k]
             (+ shared expert; Qwen2-MoE's scaled by sigmoid(shared_expert_gate x))

Routing is each model's transformers code (Routing): softmax, top-k (ERNIE's on scores plus its
score-correction bias, the weights from the unbiased softmax), optional renormalisation; capacity-free,
no token is dropped. Expert weights are stacked: gate_up [E, 2I, H] (each expert's gate rows, then its
up rows) and down [E, H, I], kept as 2-D parameters [E*2I, H] and [E*H, I] so that tensor parallelism
and dummy init cut them like MergedLinear / RowParallelLinear: each rank holds every expert's slice of
the intermediate dimension, and the block's partial output (routed + shared) is all-reduced once.

Where the experts run: with Triton chosen (CUDA; on CPU only where a test forces it, under the
interpreter), kernels/triton_moe.fused_moe (sorted by expert, two grouped GEMMs, no host sync, so CUDA
graphs capture it); otherwise `experts_torch`, the reference (tokens grouped by expert, one matmul
pair per expert hit, summed in expert order as transformers does).

With `--quantization` the stacked weights are quantized as they load, per expert in the formats of
layers/quant.py: a row of the 2-D stack is one expert's output channel, so per-row scales (wint8, fp8)
and groups of 128 inputs (wint4) are each expert's own; at tp > 1 down_proj's rows are scaled by the
full row's max |w| like RowParallelLinear's. With Triton chosen they run through
kernels/triton_moe_quant.fused_moe_quant, which reads each expert's tile quantized and dequantizes it
in registers (fp8 weight-only there: the activations are not rounded through e4m3, see that module).
Otherwise through the reference loop, each expert hit multiplying through quant_linear (on CPU:
dequantize, then matmul, exact to the dequantized model; fp8 also rounds the activations per token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.distributed.group import TPGroup
from pdserve.distributed.sharding import split
from pdserve.distributed.weights import ParamShard, copy_full_rows, load_full, set_shard
from pdserve.kernels import activation
from pdserve.kernels.ops import Kernels
from pdserve.layers.linear import MergedLinear, RowParallelLinear
from pdserve.layers.quant import (
    LoadQuantizable,
    QuantizedWeight,
    quant_linear,
    quantize,
    row_amax,
)

FusedMoe = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (x, w13, s13, w2, s2, ids, weights): the quantized stacks as kernels/triton_moe_quant takes them
FusedMoeQuant = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    torch.Tensor,
]

# checkpoint names: one tensor per expert (HF checkpoints), or transformers' stacked in-memory form
PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class Routing:
    """How a model turns router logits into (expert ids, weights)."""

    top_k: int
    normalize: bool  # divide the k weights by their sum (Qwen: norm_topk_prob; ERNIE: always)
    float32_logits: bool = False  # ERNIE: the router weight and its product in float32
    correction_bias: bool = False  # ERNIE: top-k over softmax + e_score_correction_bias
    norm_min: float = 0.0  # ERNIE: the sum is clamped to at least this before dividing


class Router(nn.Module):
    """Replicated on every rank: weight [E, H] (+ ERNIE's e_score_correction_bias [1, E])."""

    def __init__(self, hidden: int, num_experts: int, routing: Routing) -> None:
        super().__init__()
        dtype = torch.float32 if routing.float32_logits else None
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32))
            if routing.correction_bias
            else None
        )
        self.routing = routing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, K] int64, topk_weights [T, K] in x's dtype)."""
        r = self.routing
        logits = F.linear(x.float(), self.weight.float()) if r.float32_logits else F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        bias = self.e_score_correction_bias
        scores = probs if bias is None else probs + bias.squeeze(0)
        ids = torch.topk(scores, r.top_k, dim=-1).indices
        weights = probs.gather(-1, ids)
        if r.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=r.norm_min)
        return ids, weights.to(x.dtype)


@dataclass(frozen=True)
class TritonMoe:
    """The fused Triton MoE for float experts and for quantized ones."""

    float_experts: FusedMoe
    quantized_experts: FusedMoeQuant


class FusedExperts(LoadQuantizable):
    """E SwiGLU experts of intermediate size I, this rank's slice [start, start + I_r) of each."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        tp: TPGroup,
        fused: TritonMoe | None,
        kernels: Kernels,
    ) -> None:
        super().__init__()
        start, size = split(intermediate, tp.size, tp.rank)
        e, i = num_experts, intermediate
        self.num_experts, self.hidden, self.intermediate, self.local = e, hidden, intermediate, size
        with self.float_params():
            self.gate_up_proj = nn.Parameter(torch.empty(e * 2 * size, hidden))  # [E, 2I_r, H] flattened
            self.down_proj = nn.Parameter(torch.empty(e * hidden, size))  # [E, H, I_r] flattened
        segments = []
        for x in range(e):  # expert x's gate rows, then its up rows, each cut to this rank's slice
            segments += [
                (x * 2 * i + start, x * 2 * size, size),
                (x * 2 * i + i + start, x * 2 * size + size, size),
            ]
        set_shard(self.gate_up_proj, ParamShard((e * 2 * i, hidden), tuple(segments)))
        set_shard(self.down_proj, ParamShard((e * hidden, i), ((0, 0, e * hidden),), (start, size)))
        self.fused, self.kernels, self.tp = fused, kernels, tp
        self.q13: QuantizedWeight | None = None  # the stacks quantized (`quantize`), else None
        self.q2: QuantizedWeight | None = None

    @property
    def w13(self) -> torch.Tensor:  # [E, 2I_r, H]
        return self.gate_up_proj.view(self.num_experts, 2 * self.local, self.hidden)

    @property
    def w2(self) -> torch.Tensor:  # [E, H, I_r]
        return self.down_proj.view(self.num_experts, self.hidden, self.local)

    def quantize(self, method: str) -> None:
        """Both stacks quantized per expert (see the module docstring); the float ones freed."""
        amax = None
        if self.tp.size > 1 and method != "wint4":  # down_proj's full rows' max |w|, as RowParallelLinear
            local = row_amax(self.down_proj.detach())[:, None]  # [E*H, 1]
            amax = self.tp.all_gather_cols(local, [1] * self.tp.size).amax(dim=1)
        self.q13 = quantize(self.gate_up_proj.detach(), method)
        self.q2 = quantize(self.down_proj.detach(), method, amax)
        for name in ("gate_up_proj", "down_proj"):
            delattr(self, name)
            self.register_parameter(name, None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the experts' weighted outputs, [T, H]."""
        if self.fused is not None:
            return self.fused_forward(self.fused, x, ids, weights)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the torch MoE reference waits for the GPU: use Triton kernels or enforce_eager"
            )
        if self.q13 is None or self.q2 is None:
            return experts_torch(x, self.w13, self.w2, ids, weights)
        q13, q2, k, rows13, rows2 = self.q13, self.q2, self.kernels, 2 * self.local, self.hidden
        return experts_loop(
            x,
            lambda e, h: quant_linear(k, h, q13.rows(e * rows13, (e + 1) * rows13), None),
            lambda e, h: quant_linear(k, h, q2.rows(e * rows2, (e + 1) * rows2), None),
            ids,
            weights,
            self.num_experts,
        )

    def fused_forward(
        self, fused: TritonMoe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """forward through the Triton kernels: the quantized stacks read as they are, viewed per expert."""
        if self.q13 is None or self.q2 is None:
            return fused.float_experts(x, self.w13, self.w2, ids, weights)
        e = self.num_experts
        return fused.quantized_experts(x, *per_expert(self.q13, e), *per_expert(self.q2, e), ids, weights)

    def load(self, expert: int | None, part: str, tensor: torch.Tensor, prefix: str) -> list[str]:
        """One checkpoint tensor: expert `expert`'s gate_proj / up_proj / down_proj ([I, H] / [I, H] /
        [H, I]), or with expert None the stacked gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
        self.materialize()
        e, i, h = self.num_experts, self.intermediate, self.hidden
        if expert is None:
            target = self.gate_up_proj if part == "gate_up_proj" else self.down_proj
            shape = (e, 2 * i, h) if part == "gate_up_proj" else (e, h, i)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{prefix}.{part}: checkpoint shape {tuple(tensor.shape)} != model {shape}")
            load_full(target, tensor.reshape(shape[0] * shape[1], shape[2]), f"{prefix}.{part}")
            return [f"{prefix}.{n}" for n in self.fill_names() if n.split(":")[0] == part]
        if not 0 <= expert < e:
            raise KeyError(f"{prefix}.{expert}: the model has {e} experts")
        want = (h, i) if part == "down_proj" else (i, h)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{prefix}.{expert}.{part}: checkpoint shape {tuple(tensor.shape)} != {want}")
        if part == "down_proj":
            copy_full_rows(self.down_proj, tensor, expert * h)
        else:
            copy_full_rows(self.gate_up_proj, tensor, expert * 2 * i + (i if part == "up_proj" else 0))
        return [f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}:{expert}:{part}"]

    def fill_names(self) -> list[str]:
        """What a checkpoint must fill (loader._expected_fills): each expert's three tensors."""
        return [
            f"{'down_proj' if p == 'down_proj' else 'gate_up_proj'}:{x}:{p}"
            for x in range(self.num_experts)
            for p in ("gate_proj", "up_proj", "down_proj")
        ]


def per_expert(w: QuantizedWeight, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stacked quantized weight's (data [E, R, K or K/2], scale [E, R] or [E, R, G]) views."""
    data, scale = w.data, w.scale
    return data.view(num_experts, -1, data.shape[1]), scale.view(num_experts, -1, *scale.shape[1:])


ExpertProduct = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, its tokens' rows) -> product


def experts_torch(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The reference: x [T, H], w13 [E, 2I, H], w2 [E, H, I], ids / weights [T, K] -> [T, H]."""
    return experts_loop(
        x, lambda e, h: F.linear(h, w13[e]), lambda e, h: F.linear(h, w2[e]), ids, weights, w13.shape[0]
    )


def experts_loop(
    x: torch.Tensor,
    gate_up: ExpertProduct,
    down: ExpertProduct,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """experts_torch with each expert's two products given as functions. Tokens grouped by expert;
    each expert hit runs once on its tokens; outputs added in expert order."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignment numbers (token * K + slot), by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    out: torch.Tensor | None = None
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tokens = rows // k
        h = activation.silu_and_mul(gate_up(expert, x[tokens]))  # [n, I]
        y = down(expert, h) * weights.reshape(-1)[rows, None]  # [n, H]
        if out is None:
            out = torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype, device=x.device)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out if out is not None else torch.zeros_like(x)  # no token (H out = H in)


class SharedExpert(nn.Module):
    """A dense SwiGLU MLP every token goes through, its intermediate dimension split like MLP's."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup, kernels: Kernels) -> None:
        super().__init__()
        start, size = split(intermediate, tp.size, tp.rank)
        rows = {"gate": (intermediate, start, size), "up": (intermediate, start, size)}
        self.gate_up_proj = MergedLinear(hidden, rows, False, kernels)
        self.down_proj = RowParallelLinear(intermediate, hidden, (start, size), False, tp, kernels)
        self.kernels = kernels

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial output (not yet summed over ranks)."""
        return self.down_proj.product(self.gate_up_proj.silu_mul(x), None)


@dataclass(frozen=True)
class MoeShape:
    num_experts: int
    intermediate: int  # each routed expert's
    routing: Routing
    shared_intermediate: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: the shared expert scaled by sigmoid(x @ shared_expert_gate^T)


class SparseMoeBlock(nn.Module):
    """router + routed experts (+ shared expert): x [T, H] -> [T, H], summed over tensor-parallel ranks."""

    def __init__(self, hidden: int, shape: MoeShape, tp: TPGroup, kernels: Kernels) -> None:
        super().__init__()
        self.gate = Router(hidden, shape.num_experts, shape.routing)
        self.experts = FusedExperts(
            shape.num_experts, hidden, shape.intermediate, tp, fused_moe_for(kernels), kernels
        )
        self.shared_expert = (
            SharedExpert(hidden, shape.shared_intermediate, tp, kernels)
            if shape.shared_intermediate
            else None
        )
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shape.shared_gate else None
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        y = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            shared = self.shared_expert.partial(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * shared
            y = y + shared
        return self.tp.all_reduce(y) if self.tp.size > 1 else y


def fused_moe_for(kernels: Kernels) -> TritonMoe | None:
    """The Triton fused MoE where the kernel config chooses Triton (imported only then), else None."""
    if not kernels.config.triton:
        return None
    from pdserve.kernels.triton_moe import fused_moe
    from pdserve.kernels.triton_moe_quant import fused_moe_quant

    return TritonMoe(fused_moe, fused_moe_quant)


def load_expert_weight(model: nn.Module, name: str, tensor: torch.Tensor) -> list[str] | None:
    """Load `name` if it is a routed expert's tensor (per expert or stacked); None if it is not one."""
    match = PER_EXPERT.match(name)
    if match is not None:
        prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
    else:
        match = STACKED.match(name)
        if match is None:
            return None
        prefix, expert, part = match.group(1), None, match.group(2)
    try:
        module: Any = model.get_submodule(prefix)
    except AttributeError:
        return None  # not this model's (e.g. ERNIE's mtp layer): the model's own loader decides
    if not isinstance(module, FusedExperts):
        raise KeyError(f"checkpoint tensor {name}: {prefix} is not an expert block in {type(model).__name__}")
    return module.load(expert, part, tensor, prefix)

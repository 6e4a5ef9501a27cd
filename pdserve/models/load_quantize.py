"""Quantizing while loading (`--quantization`): which fills complete each LoadQuantizable module (a
projection, a block of MoE experts), so that its float weights are allocated when the first of its
tensors arrives and quantized as soon as the last one has. The float model never exists whole: the
peak is the quantized model plus the few modules being filled (layers/quant.py).

A fill is a name `load_weight` returns (`...qkv_proj.weight:q`, `...o_proj.weight`,
`...experts.down_proj:3:down_proj`) or, for dummy weights, a parameter name; its module is the part
before the last dot of what precedes the first colon. Every tensor-parallel rank reads the same
tensors in the same order, so the ranks quantize (and gather a row-parallel shard's max |w|) in step.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from pdserve.layers.quant import LoadQuantizable


def owner_of(fill: str) -> str:
    """The module name a fill or parameter name belongs to."""
    return fill.split(":")[0].rpartition(".")[0]


class LiveParams(dict[str, nn.Parameter]):
    """The model's parameters by name, each looked up when asked: a deferred module is allocated first,
    so that a checkpoint tensor is written into its real parameter, never into the meta placeholder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.named_parameters())
        self.model = model

    def __getitem__(self, name: str) -> nn.Parameter:
        owner = self.model.get_submodule(owner_of(name))
        if isinstance(owner, LoadQuantizable):
            owner.materialize()
        return self.model.get_parameter(name)


class QuantizeOnFill:
    """Quantizes each LoadQuantizable module of `model` by `method` once all its `fills` are in."""

    def __init__(self, model: nn.Module, method: str, fills: Iterable[str]) -> None:
        self.model, self.method = model, method
        self.pending: dict[str, set[str]] = {}
        for fill in fills:
            name = owner_of(fill)
            if isinstance(model.get_submodule(name), LoadQuantizable):
                self.pending.setdefault(name, set()).add(fill)

    def filled(self, fills: Iterable[str]) -> None:
        for fill in fills:
            name = owner_of(fill)
            waiting = self.pending.get(name)
            if waiting is None:
                continue
            waiting.discard(fill)
            if not waiting:
                del self.pending[name]
                module = self.model.get_submodule(name)
                assert isinstance(module, LoadQuantizable)
                module.quantize(self.method)

    def check_done(self) -> None:
        if self.pending:
            left = sorted(self.pending)
            raise ValueError(f"modules never completely loaded, so not quantized: {left[:8]}")

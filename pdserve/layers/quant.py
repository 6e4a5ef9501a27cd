"""Weight quantization (`--quantization`): a projection's quantized weight, the math that makes it from
a float weight and undoes it, and the product x @ W^T through the implementation the kernels chose.

    method  data                               scale                 w[n, k] ~=
    wint8   int8 [N, K]                        float32 [N]           data[n, k] * scale[n]
    wint4   int8 [N, K/2], two values a byte   float32 [N, K/128]    int4(n, k) * scale[n, k // 128]
    fp8     float8_e4m3fn [N, K]               float32 [N]           data[n, k] * scale[n]

All symmetric (no zero point): wint8 in [-127, 127], wint4 in [-7, 7], fp8 within +-448. wint4 packs
along K: byte j of a row holds k = 2j in its low nibble and k = 2j + 1 in its high one (two's
complement), so `(b << 4) >> 4` and `b >> 4` on int8 give the two values sign-extended; its last
group may be shorter than 128 (K = 576: 4 groups of 128 and one of 64). fp8 also quantizes the
activations, per token, at run time (kernels/fp8.py); wint8 and wint4 are weight-only.

The product: fp8 through `kernels.fp8_linear` (torch._scaled_mm on a GPU that has fp8, else the
emulation); wint through `kernels.wint_linear` (the Triton GEMM that dequantizes in registers), or
where that is None (CPU) the reference: dequantize, then F.linear, exact to the dequantized model.

Quantized while loading: a module holding big float weights (the projections, the MoE experts) is a
LoadQuantizable. Built under `deferred_weights()` its float parameters sit on the meta device (no
memory); the loader calls `materialize` before the first checkpoint tensor lands in it and `quantize`
once its last one has (models/load_quantize.py), so at most a few modules are float at any moment and
a model that fits only quantized still loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config import QUANTIZATIONS
from pdserve.kernels.fp8 import E4M3_MAX
from pdserve.kernels.ops import Kernels

WINT4_GROUP = 128  # input columns sharing one wint4 scale
_QMAX = {"wint8": 127.0, "wint4": 7.0, "fp8": E4M3_MAX}
_MIN_SCALE = 1e-12  # an all-zero row or group still gets a finite scale


class QuantizedWeight(nn.Module):
    """One projection's quantized weight: `data` and `scale` as in the table above, for [N, K]."""

    def __init__(self, method: str, data: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.method = method
        self.in_features = in_features
        # parameters (frozen), so that memory accounting over model.parameters() counts them
        self.data = nn.Parameter(data, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.method}, out={self.data.shape[0]}, in={self.in_features}"

    def rows(self, start: int, end: int) -> QuantizedWeight:
        """Rows [start, end) of this weight (a view): one expert of a stacked expert weight."""
        return QuantizedWeight(self.method, self.data[start:end], self.scale[start:end], self.in_features)


# the only module-level state here: set while build_model builds a model it will quantize as it loads
_DEFERRED: ContextVar[bool] = ContextVar("pdserve_deferred_weights", default=False)


@contextmanager
def deferred_weights() -> Iterator[None]:
    """LoadQuantizable modules built inside put their float parameters on the meta device."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class LoadQuantizable(nn.Module):
    """A module whose float weights are replaced by quantized ones once loaded (`quantize`). Its
    constructor creates them inside `self.float_params()`: on the meta device under deferred_weights(),
    to be allocated on the build's device by `materialize` when loading reaches them."""

    target_device: torch.device | None = None  # where materialize allocates; None: nothing deferred

    def float_params(self) -> AbstractContextManager[object]:
        if not _DEFERRED.get():
            return nullcontext()
        # object's setattr: called before nn.Module.__init__ has set up the module
        object.__setattr__(self, "target_device", torch.get_default_device())
        return torch.device("meta")

    def materialize(self) -> None:
        """Allocate (uninitialised) every parameter of this module still on the meta device."""
        if self.target_device is None:
            return
        for name, p in list(self.named_parameters(recurse=False)):
            if p.is_meta:
                real = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=self.target_device), False)
                for attr, value in vars(p).items():  # its ParamShard (distributed/weights.py)
                    setattr(real, attr, value)
                setattr(self, name, real)
        self.target_device = None

    def quantize(self, method: str) -> None:
        raise NotImplementedError


def check_method(method: str) -> None:
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")


def row_amax(weight: torch.Tensor) -> torch.Tensor:
    """max |w| of each row of [N, K] as float32 [N]."""
    return weight.abs().amax(dim=1).float()


def quantize(weight: torch.Tensor, method: str, amax: torch.Tensor | None = None) -> QuantizedWeight:
    """`weight` [N, K] (any float dtype) quantized by `method`. `amax` [N]: the rows' max |w| to scale
    wint8 / fp8 rows by instead of this weight's own (a row-parallel shard passes the full row's)."""
    check_method(method)
    n, k = weight.shape
    w = weight.float()
    if method == "wint4":
        return QuantizedWeight(method, *_quantize_wint4(w), k)
    scale = ((row_amax(w) if amax is None else amax.float()) / _QMAX[method]).clamp(min=_MIN_SCALE)
    scaled = w / scale[:, None]
    if method == "wint8":
        data = scaled.round().clamp(-127, 127).to(torch.int8)
    else:
        data = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(method, data, scale, k)


def _quantize_wint4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, K] (K even) -> packed int8 [N, K/2], scales [N, ceil(K/128)]."""
    n, k = w.shape
    if k % 2:
        raise ValueError(f"wint4 packs two values a byte: the input width must be even, got {k}")
    groups = -(-k // WINT4_GROUP)
    padded = F.pad(w, (0, groups * WINT4_GROUP - k)).view(n, groups, WINT4_GROUP)
    scale = (padded.abs().amax(dim=2) / _QMAX["wint4"]).clamp(min=_MIN_SCALE)  # [N, G]
    q = (padded / scale[:, :, None]).round().clamp(-7, 7).to(torch.int8).view(n, -1)[:, :k]
    return pack_int4(q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] of values in [-8, 7] -> int8 [N, K/2]: k = 2j low nibble, k = 2j + 1 high."""
    low, high = q[:, 0::2], q[:, 1::2]
    return ((low & 0xF) | (high << 4)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: int8 [N, K/2] -> int8 [N, K]."""
    low, high = (packed << 4) >> 4, packed >> 4
    return torch.stack((low, high), dim=2).view(packed.shape[0], -1)


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that `w` stands for (computed in float32, then cast to `dtype`)."""
    if w.method == "wint4":
        values = unpack_int4(w.data).float()
        scale = w.scale.repeat_interleave(WINT4_GROUP, dim=1)[:, : w.in_features]
        return (values * scale).to(dtype)
    return (w.data.float() * w.scale[:, None]).to(dtype)


def quant_linear(
    kernels: Kernels, x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ W^T (+ bias) for the quantized weight `w`, through the implementation `kernels` chose."""
    if w.method == "fp8":
        return kernels.fp8_linear(x, w.data, w.scale, bias)
    if kernels.wint_linear is not None:
        return kernels.wint_linear(x, w.data, w.scale, bias)
    return F.linear(x, dequantize(w, x.dtype), bias)

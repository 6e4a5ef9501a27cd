"""SamplingParams: the per-request decoding settings, validated where they enter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from pdserve.errors import InvalidRequestError
from pdserve.structured.spec import GrammarSpec

MAX_LOGPROBS = 20
# The sampler works in float32. Past these, a value overflows there (1 / 1e-39 and 1e39 are inf, 1e-46
# is 0) and logits turn into NaN; inside them every value means what the out-of-range one meant:
GREEDY_BELOW = 1e-5  # a smaller positive temperature is greedy (its limit; vLLM does the same)
FLOAT32_SAFE = 1e30  # temperature at most this (above: uniform alike); top_p and the repetition
# penalty at least 1 / this (top_p: the top token alike), the penalty at most this


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what a torch.Generator takes (the HTTP edge's seed width)
INT_MAX = 2**63 - 1  # counts end up in int64 tensors
_INTS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTS = ("seed", "max_tokens", "logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_BOOLS = ("ignore_eos", "skip_special_tokens")
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 forces it
MAX_BIASED_TOKENS = 1024


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (a Reserve's JSON: str keys)
    structured: GrammarSpec | None = None  # what the output must match (pdserve/structured)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.structured = GrammarSpec.of(self.structured)  # a peer's Reserve carries its wire form
        # min_tokens bans EOS where a grammar may allow only EOS: no token would be left
        _check(
            self.structured is None or self.min_tokens == 0,
            "min_tokens is not supported with structured output",
            "min_tokens",
        )
        self._check_types()
        _check(self.n >= 1, "n must be at least 1", "n")
        _check(self.temperature >= 0.0, "temperature must be >= 0", "temperature")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        _check(self.top_k >= -1, "top_k must be -1 (off), 0 (off) or a positive count", "top_k")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", "min_p")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
        _check(self.min_tokens >= 0, "min_tokens must be >= 0", "min_tokens")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens must not exceed max_tokens",
            "min_tokens",
        )
        _check(self.repetition_penalty > 0.0, "repetition_penalty must be > 0", "repetition_penalty")
        _check(
            -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]", "presence_penalty"
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]", "frequency_penalty"
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}]",
            "logprobs",
        )
        _check(all(s for s in self.stop), "stop strings must not be empty", "stop")
        _check(len(self.stop) <= 16, "at most 16 stop strings", "stop")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0", "stop_token_ids")
        self.logit_bias = _checked_bias(self.logit_bias)
        self._float32_safe()

    def _check_types(self) -> None:
        """Every field of the right type (a bool is not a number, a float not a count) and every count
        within int64, whoever built it: the HTTP edge's models, or a peer's Reserve."""
        for name in _INTS + _OPTIONAL_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_INTS:
                continue
            _check(_is_int(value), f"{name} must be an integer", name)
            lo, hi = (SEED_MIN, SEED_MAX) if name == "seed" else (-INT_MAX, INT_MAX)
            _check(lo <= value <= hi, f"{name} must be in [{lo}, {hi}]", name)
            setattr(self, name, int(value))  # numpy's too
        for name in _FLOATS:
            value = getattr(self, name)
            _check(_is_number(value), f"{name} must be a number", name)
            try:
                setattr(self, name, float(value))
            except OverflowError:  # an int like 10**400 has no float
                _check(False, f"{name} is out of range", name)
        for name in _BOOLS:
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false", name)
        stop, ids = self.stop, self.stop_token_ids
        ok_stop = isinstance(stop, list) and all(isinstance(x, str) for x in stop)
        _check(ok_stop, "stop must be strings", "stop")
        ok_ids = isinstance(ids, list) and all(_is_int(t) and t <= INT_MAX for t in ids)
        _check(ok_ids, "stop_token_ids must be integers", "stop_token_ids")
        self.stop_token_ids = [int(t) for t in ids]

    def _float32_safe(self) -> None:
        """Move values float32 cannot carry to the nearest ones that pick the same tokens."""
        self.temperature = 0.0 if self.temperature < GREEDY_BELOW else min(self.temperature, FLOAT32_SAFE)
        self.top_p = max(self.top_p, 1 / FLOAT32_SAFE)
        self.repetition_penalty = min(max(self.repetition_penalty, 1 / FLOAT32_SAFE), FLOAT32_SAFE)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether the logits change before the draw: penalties or a logit bias (penalties.py)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or bool(self.logit_bias)
        )


def _checked_bias(bias: object) -> dict[int, float] | None:
    """logit_bias with int keys (a Reserve's JSON carries them as strings) and values in +-100."""
    if bias is None:
        return None
    _check(isinstance(bias, dict), "logit_bias must map token ids to numbers", "logit_bias")
    assert isinstance(bias, dict)
    _check(len(bias) <= MAX_BIASED_TOKENS, f"logit_bias: at most {MAX_BIASED_TOKENS} tokens", "logit_bias")
    result: dict[int, float] = {}
    for key, value in bias.items():
        ok_key = _is_int(key) or (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12)
        _check(ok_key, f"logit_bias keys must be token ids, not {str(key)[:32]!r}", "logit_bias")
        ok_value = _is_number(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS  # NaN: False
        _check(ok_value, "logit_bias values must be numbers in [-100, 100]", "logit_bias")
        token = int(key)
        _check(0 <= token <= 2**31 - 1, "logit_bias token ids must be in [0, 2**31)", "logit_bias")
        result[token] = float(value)
    return result or None

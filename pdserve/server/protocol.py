"""The OpenAI-compatible wire format: request models (validated, strict) and response models.

Requests are strict about types ("8" is not an integer, 1.5 is not a count) and ignore fields they do
not know, as OpenAI clients send many. Value ranges are checked once, by SamplingParams; the checks
here cover only what SamplingParams cannot see (choice counts, seed width, fields we do not support).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdserve.cluster_secret import HandoffRefused, check_handoff
from pdserve.config import DisaggConfig
from pdserve.disagg.handoff import FromPrefill
from pdserve.errors import InvalidRequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False


class KVTransferParams(_Request):
    """What the router adds to a request it sends a decode instance: the prefill instance's KV address
    (tcp://host:port, as its /pd/info says) and URL, signed with the cluster secret (`expires`,
    `signature`: cluster_secret.sign_handoff), so a client reaching an instance directly cannot name a
    prefill instance of its own. The rest of a hand-off's fields are made by the instances themselves."""

    model_config = ConfigDict(extra="forbid")  # strict, as every request model
    prefill_kv_addr: str = Field(pattern=r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+):[0-9]{1,5}$")
    prefill_url: str | None = None
    expires: float | None = None  # unix time; missing or past: refused
    signature: str | None = None  # hex HMAC of the other fields under the cluster's "handoff" key

    @field_validator("prefill_kv_addr")
    @classmethod
    def _port_in_range(cls, addr: str) -> str:
        if not 0 < int(addr.rsplit(":", 1)[1]) < 65536:
            raise ValueError("the port must be in [1, 65535]")
        return addr

    def verified(self, disagg: DisaggConfig) -> KVTransferParams:
        """These params, if this instance takes hand-offs (else InvalidRequestError: HTTP 400) and its
        cluster signed them (else HandoffRefused: HTTP 403; a decode instance without a secret has
        nothing to check them with, so it refuses them all)."""
        if disagg.role != "decode":
            raise InvalidRequestError(
                f"this instance does not take KV from prefill instances (role {disagg.role})",
                "kv_transfer_params",
            )
        if disagg.cluster_secret is None:
            raise HandoffRefused("this instance has no cluster secret to check kv_transfer_params with")
        check_handoff(disagg.cluster_secret, self.model_dump(exclude_unset=True))  # the fields as sent
        return self

    def handoff(self) -> FromPrefill:
        """The validated hand-off the engine takes (disagg/handoff.py)."""
        return FromPrefill(self.prefill_kv_addr, self.prefill_url)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SamplingRequest(_Request):
    """The fields chat and completions share, including the vLLM extras."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_I64_MIN, le=_I64_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool | None = True
    # disaggregation: set by the router on requests it sends to a decode instance
    kv_transfer_params: KVTransferParams | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    # A string, token ids, or a batch of them (a batch of more than one is refused with a clear error).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# ---- responses -----------------------------------------------------------------------------------------


class _Response(BaseModel):
    pass


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    """Both the non-stream answer and each stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pdserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]

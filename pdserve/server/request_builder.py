"""From a validated OpenAI request to a Generation: checks, tokenization, output budget, SamplingParams.

    body --pydantic (protocol.py)--> request --checks, tokenizer, budget--> SamplingParams --> Generation

Value ranges are SamplingParams' to check; here go the checks it cannot make (unsupported fields, the
context length, token ids against the vocabulary, messages and characters before templating). Parsing,
the chat template and tokenization run on threads of their own (--prompt-threads, default one), never
on the event loop (a request of megabytes would hold /health for seconds) nor on the engine thread; each
extra thread works with its own copy of the tokenizer, which is not safe to share between threads.
Every refusal is a typed error (InvalidRequestError, ModelNotFoundError), mapped to HTTP in errors.py.
`kv_transfer_params` from the router (protocol.KVTransferParams: the prefill instance's address only)
rides along into the engine requests.

Chat: messages (tool calls and tool answers too), tools and chat_template_kwargs go through the chat
template; parsers/requested.py decides how the answer is parsed (reasoning, tool calls) and, for
tool_choice required or a named function, the grammar that constrains it. Completions: a batch of
prompts is one Generation of P * n choices; without max_tokens each gets 16 tokens at most.
The same threads answer /tokenize and /detokenize.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from pdserve.config import ServerConfig
from pdserve.engine.engine_front import EngineFront
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import InvalidRequestError, ModelNotFoundError
from pdserve.server import protocol as p
from pdserve.server.errors import validation_error
from pdserve.server.generation import Choice, Generation, Kind
from pdserve.server.metrics import RequestTracker, ServerMetrics
from pdserve.server.parsers.requested import forced_grammar, parser_spec, template_tools
from pdserve.server.sampling_defaults import load_defaults
from pdserve.server.structured_request import structured_spec

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens: OpenAI's and vLLM's default
# chat_template_kwargs a request may not set: the ones pdserve passes itself
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "tokenize",
        "return_dict",
        "return_tensors",
        "continue_final_message",
        "tokenizer_kwargs",
    }
)
MAX_TEMPLATE_KWARGS = 16


def completion_budget(req: p.SamplingRequest) -> tuple[int | None, str]:
    """The output budget asked (max_completion_tokens over max_tokens) and the field that asked it."""
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs (e.g. Qwen3's enable_thinking), checked: a few, none of pdserve's own."""
    kwargs = kwargs or {}
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidRequestError(
            f"at most {MAX_TEMPLATE_KWARGS} chat_template_kwargs", "chat_template_kwargs"
        )
    taken = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if taken:
        raise InvalidRequestError(f"chat_template_kwargs may not set {taken[0]}", "chat_template_kwargs")
    return kwargs


class RequestBuilder:
    """Turns validated OpenAI requests into Generations ready for the engine."""

    def __init__(self, engine: EngineFront, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.shared_tokenizer = engine.tokenizer  # the event loop's, and the only prompt thread's
        self.own = threading.local()  # another prompt thread's copy
        self.served_model_name = config.served_model_name or engine.model_name
        self.vocab_size = len(self.tokenizer)
        # no token covers more characters than its vocabulary entry has (byte-level entries: one per
        # byte), so a text longer than this times the context cannot fit: refused before tokenizing,
        # which for megabytes would hold the event loop (and /health) for seconds
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_chat_messages = config.max_chat_messages
        self.defaults = load_defaults(engine.model_dir, config.generation_config)
        self.config = config
        threads = config.prompt_threads
        copy_it = self._copy_tokenizer if threads > 1 else None
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pdserve-prompts", initializer=copy_it)
        cache = config.engine.cache  # the decode scheduler's rule for sharing one prompt's KV
        self.shared_prefill_min = cache.block_size + 1 if cache.enable_prefix_caching else None

    @property
    def tokenizer(self) -> Any:
        """This thread's tokenizer: its own copy on one of several prompt threads, else the shared one."""
        return getattr(self.own, "tokenizer", self.shared_tokenizer)

    def _copy_tokenizer(self) -> None:
        self.own.tokenizer = copy.deepcopy(self.shared_tokenizer)

    async def build(self, raw: Request, model: type[R], make: Callable[[R], T]) -> T:
        """Read the body here; parse, check and tokenize it on the prompt thread."""
        arrival = time.monotonic()
        body = await raw.body()
        loop = asyncio.get_running_loop()
        built = await loop.run_in_executor(self.pool, lambda: make(self.parse(body, model)))
        if isinstance(built, Generation):  # its times (TTFT, the front) count from the arrival
            for choice in built.choices:
                choice.tracker.arrival = arrival
        return built

    # ---- parsing and validation ----

    def parse(self, body: bytes, model: type[R]) -> R:
        if issubclass(model, p.ChatCompletionRequest):
            self.check_message_count(body)
        try:
            request = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        name = getattr(request, "model", None)
        if name != self.served_model_name and not (
            name is None and isinstance(request, p.TokenizeRequest | p.DetokenizeRequest)
        ):
            raise ModelNotFoundError(f"the model {name!r} does not exist")
        if isinstance(request, p.SamplingRequest) and (field := request.unsupported()) is not None:
            raise InvalidRequestError(f"{field} is not supported", field)
        return request

    def check_message_count(self, body: bytes) -> None:
        """Count a chat body's messages before pydantic builds a model of each: 100,000 empty ones take
        it ~0.2 s, all of it holding the GIL (and so the event loop); a plain JSON parse takes a fifth."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return  # pydantic says what is wrong with it
        messages = parsed.get("messages") if isinstance(parsed, dict) else None
        if isinstance(messages, list) and len(messages) > self.max_chat_messages:
            raise InvalidRequestError(
                f"{len(messages)} messages: at most {self.max_chat_messages} are allowed", "messages"
            )

    def check_common(self, req: p.SamplingRequest) -> None:
        if req.kv_transfer_params is not None:  # before tokenizing: a forged hand-off costs nothing
            req.kv_transfer_params.verified(self.engine.config.disagg)
        if req.stream_options is not None and not req.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")
        if any(not 0 <= t < self.vocab_size for t in req.stop_token_ids or ()):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")

    # ---- tokenization ----

    def chat_prompt(
        self, req: p.ChatCompletionRequest | p.TokenizeRequest, add_generation_prompt: bool = True
    ) -> list[int]:
        """The messages (tool calls and tool answers too) and tools through the chat template."""
        messages = [m.for_template() for m in req.messages or ()]
        self.check_text_fits(sum(len(m["content"]) for m in messages), "messages")
        kwargs = template_kwargs(req.chat_template_kwargs)
        tools = template_tools(req)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages is the client's case
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", "messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def completion_prompts(self, req: p.CompletionRequest) -> list[list[int]]:
        """Each prompt's token ids: a string, token ids, or a batch of either."""
        prompts = req.prompts()
        if not prompts:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(prompts) > p.MAX_PROMPTS:
            raise InvalidRequestError(
                f"{len(prompts)} prompts: at most {p.MAX_PROMPTS} in one request", "prompt"
            )
        self.check_text_fits(sum(len(x) for x in prompts if isinstance(x, str)), "prompt")
        return [list(self.tokenizer.encode(x)) if isinstance(x, str) else self.check_ids(x) for x in prompts]

    def check_text_fits(self, chars: int, param: str) -> None:
        """Refuse a text that cannot fit the context whatever its tokens, before tokenizing it."""
        limit = self.engine.max_model_len
        if chars >= self.max_token_chars * limit:
            raise InvalidRequestError(
                f"the prompt has {chars} characters: more tokens than the model's context of {limit}", param
            )

    def check_ids(self, ids: list[int]) -> list[int]:
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return list(ids)

    # ---- /tokenize and /detokenize ----

    def tokenize(self, req: p.TokenizeRequest) -> p.TokenizeResponse:
        """A prompt's token ids, or chat messages' through the chat template (vLLM's /tokenize)."""
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give either a prompt or messages", "prompt")
        if req.messages is not None:
            ids = self.chat_prompt(req, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            self.check_text_fits(len(req.prompt), "prompt")
            ids = list(
                self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
            )
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return p.TokenizeResponse(
            count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids, token_strs=strs
        )

    def detokenize(self, req: p.DetokenizeRequest) -> p.DetokenizeResponse:
        if any(not 0 <= t < self.vocab_size for t in req.tokens):
            raise InvalidRequestError(f"tokens must be in [0, {self.vocab_size})", "tokens")
        return p.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    # ---- sampling parameters ----

    def logit_bias(self, req: p.SamplingRequest) -> dict[int, float] | None:
        """The bias by token id (JSON keys are strings), each id in the vocabulary."""
        if not req.logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else -1
            if not 0 <= token < self.vocab_size:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids in [0, {self.vocab_size}), not {key[:32]!r}",
                    "logit_bias",
                )
            bias[token] = value
        return bias

    def sampling_params(
        self, req: p.SamplingRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        d = self.defaults  # for the fields the request leaves out (sampling_defaults.py)
        top_k = d.top_k if req.top_k is None else req.top_k
        repetition = d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
        return SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=0 if top_k >= self.vocab_size else top_k,  # at least the vocabulary: no filter
            min_p=d.min_p if req.min_p is None else req.min_p,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=bool(req.ignore_eos),
            repetition_penalty=repetition,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens is not False,
            logit_bias=self.logit_bias(req),
            structured=structured_spec(req),  # response_format, structured_outputs, guided_*
        )

    def max_tokens(
        self,
        prompt_len: int,
        max_tokens: int | None,
        param: str,
        prompt_param: str,
        default: int | None = None,
    ) -> int | None:
        """The output budget: what was asked if it fits the context; None asked: `default`, at most the
        rest of the context (no default: all of it)."""
        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", prompt_param)
        if prompt_len >= limit:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens; the model's context is {limit} tokens, "
                "which leaves no room to generate",
                prompt_param,
            )
        if max_tokens is None:
            return limit - prompt_len if default is None else min(default, limit - prompt_len)
        if max_tokens < 1:  # SamplingParams would say so too, but would name max_tokens
            raise InvalidRequestError(f"{param} must be at least 1", param)
        if prompt_len + max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) exceeds the model's context "
                f"of {limit} tokens",
                param,
            )
        return max_tokens

    # ---- building a generation ----

    def chat_generation(self, req: p.ChatCompletionRequest) -> Generation:
        self.check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        parsing = parser_spec(req, self.config)
        ids = self.chat_prompt(req)
        max_tokens, param = completion_budget(req)
        max_tokens = self.max_tokens(len(ids), max_tokens, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs)
        grammar = forced_grammar(req, parsing)
        if grammar is not None:
            if params.structured is not None:
                raise InvalidRequestError(
                    "tool_choice required or a named function constrains the output itself: "
                    "give no response_format, structured_outputs or guided_* with it",
                    "tool_choice",
                )
            params = dataclasses.replace(params, structured=grammar)
        gen = self.generation("chat", f"chatcmpl-{uuid.uuid4().hex}", req, [ids], params)
        gen.parsing = parsing if parsing.active else None
        if gen.parsing is not None and req.resume is not None and req.stream:
            resumed = self.tokenizer.decode(
                req.resume.output_token_ids, skip_special_tokens=params.skip_special_tokens
            )  # as the engine's detokenizer reads them
            gen.parsed_before = resumed[: req.resume.text_chars_sent]
        return gen

    def completion_generation(self, req: p.CompletionRequest) -> Generation:
        self.check_common(req)
        if req.suffix is not None:
            raise InvalidRequestError("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise InvalidRequestError("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError("echo with logprobs (the prompt's logprobs) is not supported", "echo")
        prompts = self.completion_prompts(req)
        max_tokens, param = completion_budget(req)
        budgets = [
            self.max_tokens(len(ids), max_tokens, param, "prompt", COMPLETION_MAX_TOKENS) for ids in prompts
        ]
        params = self.sampling_params(req, budgets[0], req.logprobs)
        gen = self.generation("completion", f"cmpl-{uuid.uuid4().hex}", req, prompts, params)
        gen.budgets = budgets
        if req.echo:
            texts = req.prompts()
            gen.echo = [x if isinstance(x, str) else self.tokenizer.decode(x) for x in texts]
        return gen

    def generation(
        self,
        kind: Kind,
        request_id: str,
        req: p.SamplingRequest,
        prompts: list[list[int]],
        params: SamplingParams,
    ) -> Generation:
        n = req.n or 1
        if req.resume is not None:
            self.check_resume(req.resume, n * len(prompts))
            if not req.stream and params.logprobs is not None:
                raise InvalidRequestError(
                    "logprobs with resume needs stream: a non-streamed answer repeats the resumed "
                    "tokens, whose logprobs this instance does not have",
                    "logprobs",
                )
        choices = [Choice(i, RequestTracker(self.metrics)) for i in range(n * len(prompts))]
        return Generation(
            kind,
            request_id,
            self.served_model_name,
            prompts[0],
            params,
            n,
            bool(req.stream),
            req.include_usage,
            choices,
            None
            if req.kv_transfer_params is None
            else req.kv_transfer_params.verified(self.engine.config.disagg).handoff(),
            resume=req.resume,
            prompts=prompts,
            continuous_usage=req.continuous_usage,
            shared_prefill_min=self.shared_prefill_min,
        )

    def check_resume(self, resume: p.ResumeParams, n: int) -> None:
        """What the engine cannot see of a resume: one choice only, token ids of this tokenizer. The
        rest (the context, text_chars_sent against the resumed text) is the engine's to check."""
        if n != 1:
            raise InvalidRequestError("resume needs n = 1 and one prompt", "resume")
        if any(not 0 <= t < self.vocab_size for t in resume.output_token_ids):
            raise InvalidRequestError(f"resume.output_token_ids must be in [0, {self.vocab_size})", "resume")

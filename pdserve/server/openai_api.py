"""The OpenAI-compatible HTTP front of one instance: FastAPI app, handlers, SSE streaming, run_server.

    POST /v1/chat/completions, /v1/completions   text in -> token ids -> AsyncEngine -> text out
    GET  /v1/models, /health, /metrics, /debug/kv

Handlers validate (protocol.py), tokenize (here, on the event loop, never on the engine thread), build
SamplingParams (which validates values), and stream or collect the engine's deltas. n choices are n
engine requests added as one group. Errors become HTTP answers in errors.py only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from pdserve.config import ServerConfig
from pdserve.engine.async_engine import AsyncEngine, RequestStream, SubRequest
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Logprob
from pdserve.engine.sampling import SamplingParams
from pdserve.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    PDServeError,
    PrefillFailedError,
)
from pdserve.server import protocol as p
from pdserve.server.errors import (
    AuthenticationError,
    ClientDisconnectedError,
    ErrorKind,
    error_body,
    install_error_handlers,
    kind_of,
    validation_error,
)
from pdserve.server.metrics import CONTENT_TYPE, RequestTracker, ServerMetrics

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
Kind = Literal["chat", "completion"]
_FINISHED_OK = ("stop", "length")
_MIN_LOGPROB = -9999.0


# ---- one generation: its requests and its choices --------------------------------------------------------


@dataclass
class _Choice:
    """What one of the n choices has produced so far."""

    index: int
    tracker: RequestTracker
    text: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters of token text already reported

    def add(self, out: RequestOutput) -> None:
        self.tracker.on_output(out)
        self.text.append(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        self.num_output_tokens += len(out.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass
class _Generation:
    kind: Kind
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    choices: list[_Choice]
    kv_transfer: dict[str, Any] | None = None  # from the router: where this request's KV comes from
    created: int = field(default_factory=lambda: int(time.time()))

    def sub_request_id(self, index: int) -> str:
        return self.request_id if self.n == 1 else f"{self.request_id}-{index}"

    def sub_requests(self) -> list[SubRequest]:
        return [
            (self.sub_request_id(i), self.prompt_token_ids, _choice_params(self.params, i), self.kv_transfer)
            for i in range(self.n)
        ]

    def choice_of(self, out: RequestOutput) -> _Choice:
        return self.choices[0] if self.n == 1 else self.choices[int(out.request_id.rsplit("-", 1)[1])]

    def usage(self) -> p.Usage:
        completion = sum(c.num_output_tokens for c in self.choices)
        prompt = len(self.prompt_token_ids)
        return p.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=p.PromptTokensDetails(cached_tokens=self.choices[0].num_cached_tokens),
        )


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n: its own request, seeded seed+i when a seed is given."""
    seed = params.seed
    if seed is not None and index:
        seed = (seed + index + 2**63) % 2**64 - 2**63  # stays a valid 64-bit seed
    return dataclasses.replace(params, n=1, seed=seed)


def _ended_badly(out: RequestOutput) -> bool:
    return out.finished and out.finish_reason not in _FINISHED_OK


# ---- the server ---------------------------------------------------------------------------------------


class OpenAIServer:
    """Turns validated OpenAI requests into engine requests and engine outputs into OpenAI answers."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.served_model_name = config.served_model_name or engine.model_name
        self.vocab_size = len(self.tokenizer)
        self._token_strs: dict[int, str] = {}

    # ---- parsing and validation ----

    async def parse(self, raw: Request, model: type[R]) -> R:
        body = await raw.body()
        try:
            request = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if getattr(request, "model", None) != self.served_model_name:
            raise ModelNotFoundError(f"the model {getattr(request, 'model', None)!r} does not exist")
        return request

    def check_common(self, req: p.SamplingRequest) -> None:
        if req.stream_options is not None and not req.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")
        if req.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", "logit_bias")
        if any(not 0 <= t < self.vocab_size for t in req.stop_token_ids or ()):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")

    # ---- tokenization ----

    def chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template that refuses these messages is the client's case
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", "messages") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def completion_prompt(self, req: p.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise InvalidRequestError("exactly one prompt per request is supported", "prompt")
            one = prompt[0]
            return list(self.tokenizer.encode(one)) if isinstance(one, str) else self.check_ids(one)
        return self.check_ids(prompt)  # type: ignore[arg-type]

    def check_ids(self, ids: list[int]) -> list[int]:
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return list(ids)

    # ---- sampling parameters ----

    def sampling_params(
        self, req: p.SamplingRequest, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        top_k = req.top_k or 0
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k >= self.vocab_size else top_k,  # at least the vocabulary: no filter
            min_p=req.min_p or 0.0,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=bool(req.ignore_eos),
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens is not False,
        )

    def max_tokens(
        self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str
    ) -> int | None:
        """The output budget: what was asked if it fits the context; None asked: the rest of the context."""
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
            return limit - prompt_len
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

    def chat_generation(self, req: p.ChatCompletionRequest) -> _Generation:
        self.check_common(req)
        if req.tools:
            raise InvalidRequestError("tools are not supported", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise InvalidRequestError("only response_format type 'text' is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        ids = self.chat_prompt(req)
        use_completion_tokens = req.max_completion_tokens is not None
        max_tokens = req.max_completion_tokens if use_completion_tokens else req.max_tokens
        param = "max_completion_tokens" if use_completion_tokens else "max_tokens"
        max_tokens = self.max_tokens(len(ids), max_tokens, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs)
        return self.generation("chat", f"chatcmpl-{uuid.uuid4().hex}", req, ids, params)

    def completion_generation(self, req: p.CompletionRequest) -> _Generation:
        self.check_common(req)
        if req.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        if req.suffix is not None:
            raise InvalidRequestError("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise InvalidRequestError("best_of other than n is not supported", "best_of")
        ids = self.completion_prompt(req)
        max_tokens = self.max_tokens(len(ids), req.max_tokens, "max_tokens", "prompt")
        params = self.sampling_params(req, max_tokens, req.logprobs)
        return self.generation("completion", f"cmpl-{uuid.uuid4().hex}", req, ids, params)

    def generation(
        self, kind: Kind, request_id: str, req: p.SamplingRequest, ids: list[int], params: SamplingParams
    ) -> _Generation:
        n = req.n or 1
        choices = [_Choice(i, RequestTracker(self.metrics)) for i in range(n)]
        return _Generation(
            kind,
            request_id,
            self.served_model_name,
            ids,
            params,
            n,
            bool(req.stream),
            req.include_usage,
            choices,
            req.kv_transfer_params,
        )

    # ---- running it ----

    async def run(self, gen: _Generation, raw: Request) -> Response:
        stream = await self.engine.add(gen.sub_requests())
        fmt = _ChatFormat(self) if gen.kind == "chat" else _CompletionFormat(self)
        if gen.stream:
            return _SSEResponse(self.sse(gen, stream, fmt), on_close=lambda: self._close(gen, stream))
        await self.collect(gen, stream, raw)
        return Response(fmt.response(gen).model_dump_json(), media_type="application/json")

    async def collect(self, gen: _Generation, stream: RequestStream, raw: Request) -> None:
        """Gather every choice's outputs; abort if the client goes away before the answer is ready."""
        task = asyncio.ensure_future(self._consume(gen, stream))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and await raw.is_disconnected():
                    raise ClientDisconnectedError("client disconnected")
            task.result()
        finally:
            task.cancel()
            self._close(gen, stream)

    async def _consume(self, gen: _Generation, stream: RequestStream) -> None:
        async for out in stream:
            if _ended_badly(out):
                gen.choice_of(out).tracker.finish(out.finish_reason or "error")
                raise self.failure(out)
            gen.choice_of(out).add(out)

    async def sse(self, gen: _Generation, stream: RequestStream, fmt: _Format) -> AsyncIterator[str]:
        """The event stream; leaving it early (client gone: cancelled) aborts what is still running."""
        try:
            for chunk in fmt.opening(gen):
                yield _sse(chunk, gen.include_usage)
            async for out in stream:
                if _ended_badly(out):
                    gen.choice_of(out).tracker.finish(out.finish_reason or "error")
                    yield _sse_json(_stream_error(self.failure(out)))
                    break
                choice = gen.choice_of(out)
                choice.add(out)
                for chunk in fmt.chunks(gen, choice, out):
                    yield _sse(chunk, gen.include_usage)
            else:
                if gen.include_usage:
                    yield _sse(fmt.usage_chunk(gen), True)
            yield "data: [DONE]\n\n"
        finally:
            self._close(gen, stream)

    def _close(self, gen: _Generation, stream: RequestStream) -> None:
        stream.abort()
        for choice in gen.choices:
            choice.tracker.finish("abort")  # no-op for choices that finished

    def failure(self, out: RequestOutput) -> PDServeError | RuntimeError:
        if self.engine.fatal_error is not None:
            return EngineDeadError(f"the engine stopped: {self.engine.fatal_error}")
        if out.finish_reason == "abort":
            return EngineDeadError("the request was aborted: the server is shutting down")
        if out.error and out.error.startswith("prefill_failed:"):
            return PrefillFailedError(out.error.removeprefix("prefill_failed:").strip())
        return RuntimeError(out.error or "the request failed in the engine")

    # ---- logprobs ----

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id])
        return s


class _SSEResponse(StreamingResponse):
    """An event stream that runs `on_close` however it ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)  # -inf is not JSON


def _sse(chunk: BaseModel, include_usage: bool) -> str:
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def _sse_json(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream_error(error: BaseException) -> dict[str, Any]:
    kind = kind_of(error)
    return error_body(str(error), kind)


# ---- the two answer formats -----------------------------------------------------------------------------


class _Format:
    """How one kind of endpoint shapes its stream chunks and its whole answer."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server

    def opening(self, gen: _Generation) -> list[BaseModel]:
        return []

    def chunks(self, gen: _Generation, choice: _Choice, out: RequestOutput) -> list[BaseModel]:
        raise NotImplementedError

    def usage_chunk(self, gen: _Generation) -> BaseModel:
        raise NotImplementedError

    def response(self, gen: _Generation) -> BaseModel:
        raise NotImplementedError


class _ChatFormat(_Format):
    def opening(self, gen: _Generation) -> list[BaseModel]:
        return [
            self._chunk(gen, p.ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
            for i in range(gen.n)
        ]

    def chunks(self, gen: _Generation, choice: _Choice, out: RequestOutput) -> list[BaseModel]:
        result: list[BaseModel] = []
        if out.new_text or out.new_logprobs:
            logprobs = self.logprobs(gen, out.new_logprobs)
            delta = p.ChatChunkChoice(index=choice.index, delta={"content": out.new_text}, logprobs=logprobs)
            result.append(self._chunk(gen, delta))
        if out.finished:
            end = p.ChatChunkChoice(index=choice.index, delta={}, finish_reason=out.finish_reason)
            result.append(self._chunk(gen, end))
        return result

    def _chunk(self, gen: _Generation, *choices: p.ChatChunkChoice) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            id=gen.request_id, created=gen.created, model=gen.model, choices=list(choices)
        )

    def usage_chunk(self, gen: _Generation) -> BaseModel:
        return p.ChatCompletionChunk(
            id=gen.request_id, created=gen.created, model=gen.model, choices=[], usage=gen.usage()
        )

    def response(self, gen: _Generation) -> BaseModel:
        choices = [
            p.ChatChoice(
                index=c.index,
                message=p.AssistantMessage(content="".join(c.text)),
                logprobs=self.logprobs(gen, c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in gen.choices
        ]
        return p.ChatCompletionResponse(
            id=gen.request_id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage()
        )

    def logprobs(self, gen: _Generation, logprobs: list[Logprob]) -> p.ChatLogprobs | None:
        if gen.params.logprobs is None:
            return None
        k = gen.params.logprobs
        return p.ChatLogprobs(content=[self._entry(lp, k) for lp in logprobs])

    def _entry(self, lp: Logprob, k: int) -> p.ChatTokenLogprob:
        top = [self._top(t, v) for t, v in lp.top[:k]]
        s = self.server.token_str(lp.token_id)
        return p.ChatTokenLogprob(
            token=s, logprob=_clamp(lp.logprob), bytes=list(s.encode()), top_logprobs=top
        )

    def _top(self, token_id: int, logprob: float) -> p.TopLogprob:
        s = self.server.token_str(token_id)
        return p.TopLogprob(token=s, logprob=_clamp(logprob), bytes=list(s.encode()))


class _CompletionFormat(_Format):
    def chunks(self, gen: _Generation, choice: _Choice, out: RequestOutput) -> list[BaseModel]:
        if not (out.new_text or out.new_logprobs or out.finished):
            return []
        choice_out = p.CompletionChoice(
            index=choice.index,
            text=out.new_text,
            logprobs=self.logprobs(gen, choice, out.new_logprobs),
            finish_reason=out.finish_reason if out.finished else None,
        )
        return [
            p.CompletionResponse(
                id=gen.request_id, created=gen.created, model=gen.model, choices=[choice_out]
            )
        ]

    def usage_chunk(self, gen: _Generation) -> BaseModel:
        return p.CompletionResponse(
            id=gen.request_id, created=gen.created, model=gen.model, choices=[], usage=gen.usage()
        )

    def response(self, gen: _Generation) -> BaseModel:
        choices = []
        for c in gen.choices:
            c.text_offset = 0
            logprobs = self.logprobs(gen, c, c.logprobs)
            choices.append(
                p.CompletionChoice(
                    index=c.index, text="".join(c.text), logprobs=logprobs, finish_reason=c.finish_reason
                )
            )
        return p.CompletionResponse(
            id=gen.request_id, created=gen.created, model=gen.model, choices=choices, usage=gen.usage()
        )

    def logprobs(
        self, gen: _Generation, choice: _Choice, logprobs: list[Logprob]
    ) -> p.CompletionLogprobs | None:
        if gen.params.logprobs is None:
            return None
        k = gen.params.logprobs
        result = p.CompletionLogprobs()
        for lp in logprobs:
            s = self.server.token_str(lp.token_id)
            top = {self.server.token_str(t): _clamp(v) for t, v in lp.top[:k]}
            top.setdefault(s, _clamp(lp.logprob))
            result.tokens.append(s)
            result.token_logprobs.append(_clamp(lp.logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(s)
        return result


# ---- the app ------------------------------------------------------------------------------------------


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise AuthenticationError("a valid API key is required: Authorization: Bearer <key>")

    return check


def _v1_router(server: OpenAIServer, config: ServerConfig) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(config.api_key))])

    @router.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        req = await server.parse(raw, p.ChatCompletionRequest)
        return await server.run(server.chat_generation(req), raw)

    @router.post("/completions")
    async def completions(raw: Request) -> Response:
        req = await server.parse(raw, p.CompletionRequest)
        return await server.run(server.completion_generation(req), raw)

    @router.get("/models")
    async def models() -> p.ModelList:
        card = p.ModelCard(
            id=server.served_model_name,
            root=server.engine.model_name,
            max_model_len=server.engine.max_model_len,
        )
        return p.ModelList(data=[card])

    return router


def _ops_router(engine: AsyncEngine, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            raise EngineDeadError(f"the engine is not running: {engine.fatal_error or 'stopped'}")
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        if engine.is_healthy():
            metrics.set_engine_stats(await engine.stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/pd/info")
    async def pd_info() -> Response:
        """Role, KV/control address and load: what the router and peers need to know. Never waits
        for the engine thread (a long prefill step must not look like a dead instance)."""
        load = dict(engine.load)
        body = {"role": engine.role, "model": engine.model_name, "kv_addr": engine.kv_addr, "load": load}
        return JSONResponse(body)

    @router.get("/debug/kv")
    async def debug_kv() -> Response:
        stats = await engine.stats()
        pool_free = await engine.check_pool_free()
        body = {
            "num_blocks": stats.num_blocks,
            "num_free_blocks": stats.num_free_blocks,
            "pool_free": pool_free,
        }
        return JSONResponse(body)

    return router


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The app for one started AsyncEngine. The engine's lifetime belongs to the caller."""
    metrics = ServerMetrics()
    server = OpenAIServer(engine, config, metrics)
    app = FastAPI(title="pdserve", version="0.1.0")
    app.state.server = server
    app.state.metrics = metrics

    def count_error(kind: ErrorKind) -> None:
        metrics.count(kind.outcome)

    install_error_handlers(app, count_error)
    app.include_router(_v1_router(server, config))
    app.include_router(_ops_router(engine, metrics))
    return app


def run_server(config: ServerConfig) -> None:
    """Start the engine, serve HTTP until SIGTERM/SIGINT, then stop both cleanly (exit status 0)."""
    engine = AsyncEngine(config.engine)
    logger.info("loading %s", config.engine.model.path)
    engine.start()
    try:
        app = build_app(engine, config)
        server = _make_uvicorn(app, config)
        name = config.served_model_name or engine.model_name
        logger.info("serving %s at http://%s:%d/v1", name, config.host, config.port)
        server.run()  # returns once a signal asked it to stop and open requests drained
    finally:
        engine.shutdown()
        logger.info("stopped")


def _make_uvicorn(app: FastAPI, config: ServerConfig) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the stop signal after draining, which would kill us before cleanup."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5
    )
    return Server(uv_config)

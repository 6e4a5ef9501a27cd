"""Engine.step(): schedule -> run -> update. Owns the scheduler, the runner and per-request detokenizers.

Single-threaded by design: AsyncEngine drives it from one thread. Text exists only here and above;
the scheduler and runner see token ids.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from transformers import AutoConfig, AutoTokenizer

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.outputs import EngineStats, RequestOutput
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.errors import InvalidRequestError
from pdserve.layers.sampler import SampleResult
from pdserve.models.prepare import resolve_model

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        path = resolve_model(config.model.path or None)
        self.config = config = replace(config, model=replace(config.model, path=path))
        self.hf_config = AutoConfig.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model_name = path.rstrip("/").rsplit("/", 1)[-1]
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 4096))
        self.max_model_len = min(config.model.max_model_len or model_max, model_max)
        self.eos_token_ids = self._eos_ids(path)
        self.runner = ModelRunner(config.model, config.cache, self.hf_config)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.detokenizers: dict[str, Detokenizer] = {}
        self.pending: list[RequestOutput] = []  # outputs produced outside step(), e.g. aborts
        self.num_steps = 0
        self.num_prefill_tokens = 0

    def _eos_ids(self, path: str) -> tuple[int, ...]:
        ids: set[int] = set()
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(path).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}",
                param="messages",
            )
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        request = Request(request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len)
        self.scheduler.add_request(request)
        self.detokenizers[request_id] = Detokenizer(
            self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens
        )

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        self.pending.append(self._output(request, [], []))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self.pending)

    def step(self) -> list[RequestOutput]:
        outputs, self.pending = self.pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        sched.chunks.sort(key=lambda c: c.num_tokens != 1)  # decodes first, as the runner wants
        results = self.runner.execute(sched.chunks)
        return outputs + self._update(sched, results)

    def _update(self, sched: SchedulerOutput, results: list[SampleResult]) -> list[RequestOutput]:
        sampling = [c.request for c in sched.chunks if c.samples]
        self.num_steps += 1
        self.num_prefill_tokens += sum(c.num_tokens for c in sched.chunks if c.num_tokens > 1)
        self.scheduler.update_computed(sched)
        outputs = []
        for request, result in zip(sampling, results, strict=True):
            request.append_token(result.token_id)
            if result.logprob is not None:
                request.logprobs.append(result.logprob)
            status = request.check_stop_token()
            if self.detokenizers[request.request_id].add_token(result.token_id) and status is None:
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self.scheduler.finish_request(request, status)
            logprobs = [result.logprob] if result.logprob is not None else []
            outputs.append(self._output(request, [result.token_id], logprobs))
        return outputs

    def _output(self, request: Request, new_ids: list[int], logprobs: list) -> RequestOutput:
        finished = request.is_finished
        detok = self.detokenizers[request.request_id]
        if finished:
            del self.detokenizers[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            new_text=detok.take(finished),
            finished=finished,
            finish_reason=request.status.value if finished else None,
            new_logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            error=request.error,
        )

    def check_pool_free(self) -> bool:
        return (
            not self.scheduler.has_unfinished
            and self.block_manager.num_free_blocks == self.block_manager.num_blocks
        )

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.query_tokens,
            prefix_cache_hits=bm.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_prefill_tokens=self.num_prefill_tokens,
            num_steps=self.num_steps,
        )

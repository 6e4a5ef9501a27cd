"""Engine.step(): schedule -> run -> update. Owns the scheduler, the runner and per-request detokenizers.

A step is launched, not waited for: the next step() collects its tokens (stop tokens, lengths, KV
hand-off), launches the following step, and only then detokenizes and builds the collected step's
outputs, so that host work overlaps the GPU. A request stopped by a stop string in that last part has
already been launched once more; that token is dropped when collected (request.is_finished). In a
steady decode batch the next step is even launched before the previous one is collected (ahead.py).

Single-threaded by design: AsyncEngine drives it from one thread. Text exists only here and above;
the scheduler and runner see token ids. With a KV connector (role prefill or decode), each step applies
the connector's typed actions (disagg/actions.py: prompts to prefill for a decode instance, KV that
landed for ours, failures, blocks to free) and sends the Reserves for the requests the scheduler just
reserved blocks for; the scheduler itself does no network I/O.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from pdserve.config import EngineConfig
from pdserve.disagg.actions import Action, Activate, Cancel, Fail, Release, StartPrefill
from pdserve.disagg.connector import KVConnector
from pdserve.disagg.handoff import FirstToken, FromPrefill, HandOff, PromptKV, ToDecode
from pdserve.disagg.transport.factory import make_transport
from pdserve.engine.ahead import InFlight, can_run_ahead, schedule_ahead
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import Detokenizer
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.outputs import EngineStats, RequestOutput, TransferLog
from pdserve.engine.request import Logprob, Request, RequestStatus
from pdserve.engine.resume import Resume
from pdserve.engine.sampler import SampleResult
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.step_clock import StepClock
from pdserve.errors import InvalidRequestError, OverloadedError, PDServeError
from pdserve.models.prepare import resolve_model, tokenizer_path
from pdserve.structured.compiler import Grammars
from pdserve.structured.matcher import Matcher

logger = logging.getLogger(__name__)
Token = tuple[Request, SampleResult]  # a sampled token appended to its request, not yet detokenized


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        path = resolve_model(config.model.path or None)
        self.config = config = replace(config, model=replace(config.model, path=path))
        self.hf_config = AutoConfig.from_pretrained(path)
        self.tokenizer_dir = tokenizer_path(config.model)  # resolved once: fronts load their own copy
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.model_name = path.rstrip("/").rsplit("/", 1)[-1]
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 4096))
        self.eos_token_ids = self._eos_ids(path)
        self.grammars = Grammars(self.tokenizer, int(self.hf_config.vocab_size), self.eos_token_ids)
        cache = replace(config.cache, share_pool=config.moves_sharded_kv)
        self.runner = ModelRunner(
            config.model, cache, self.hf_config, config.scheduler, kernels=config.kernels
        )
        pool_tokens = self.runner.num_blocks * config.cache.block_size
        self.max_model_len = min(config.model.max_model_len or model_max, model_max, pool_tokens)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.connector = self._make_connector() if config.disagg.enabled else None
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.connector)
        self.detokenizers: dict[str, Detokenizer] = {}
        self.pending: list[RequestOutput] = []  # outputs produced outside step(), e.g. aborts
        self.in_flight: InFlight | None = None  # the step launched on the device, not yet collected
        self.num_steps = 0
        self.num_steps_ahead = 0
        self.num_prefill_tokens = 0  # prompt tokens this instance ran through the model
        self.clock = StepClock(self.runner.device)  # device busy time and host waits, for /metrics
        self.kv_times = TransferLog()  # cumulative: any number of stats() readers
        self.idle = False  # the last step had nothing to compute (all waiting on peers or blocks)
        overlap = config.scheduler.overlap_outputs
        self.overlap = self.runner.device.type == "cuda" if overlap is None else overlap

    def _make_connector(self) -> KVConnector:
        d = self.config.disagg
        transport = make_transport(
            d.kv_transport, d.kv_host, d.kv_port, d.kv_advertise_host, d.cluster_secret
        )
        lay = self.runner.layout
        layout = {
            "num_layers": lay.num_layers,
            "num_kv_heads": int(self.hf_config.num_key_value_heads),  # on the wire: every head, any TP
            "head_dim": lay.head_dim,
            "block_size": lay.block_size,
            "dtype": str(lay.dtype),
            "quantization": self.config.model.quantization or "none",  # disagg/compat.py
            "kv_scales": self.runner.kv_scales.digest if self.runner.kv_scales else "none",  # fp8 KV
        }
        return KVConnector(
            transport,
            self.runner.kv_cache,
            layout,
            self.model_name,
            d.kv_transfer_timeout,
            d.peer_timeout,
            self.runner.kv_shards,
            vocab_size=int(self.hf_config.vocab_size),
        )

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()
        self.runner.close()  # CUDA graphs, then tensor-parallel workers

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

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        handoff: HandOff | None = None,
        resume: Resume | None = None,
    ) -> None:
        """Queue a request. With `resume`, it starts with those outputs already generated
        (engine/resume.py); if they end it already (a stop token, a stop string, its length), it
        finishes at once with what text is left, unless it is a prefill for a peer (refused)."""
        prompt_token_ids = self._checked_ids(prompt_token_ids, "prompt")
        outputs = self._checked_ids(list(resume.output_token_ids), "resume") if resume else []
        if resume is not None and not outputs:
            raise InvalidRequestError("resume.output_token_ids must not be empty", param="resume")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; this server's context is {self.max_model_len}",
                param="prompt",
            )
        if len(prompt_token_ids) + len(outputs) > self.max_model_len:
            raise InvalidRequestError(
                f"prompt and resumed outputs have {len(prompt_token_ids) + len(outputs)} tokens; this "
                f"server's context is {self.max_model_len}",
                param="resume",
            )
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        role = self.config.disagg.role
        if isinstance(handoff, FromPrefill) and role != "decode":
            raise InvalidRequestError(
                f"this instance does not take KV from prefill instances (role {role})", "kv_transfer_params"
            )
        request = Request(
            request_id, prompt_token_ids, params, self.eos_token_ids, self.max_model_len, handoff, outputs
        )
        if params.structured is not None:
            request.matcher = self._matcher(params, outputs)
        detokenizer = Detokenizer(self.tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens)
        ended = self._resumed_end(request, detokenizer, resume) if resume is not None else None
        self.scheduler.add_request(request)  # last: whatever raises before leaves nothing behind
        self.detokenizers[request_id] = detokenizer
        if ended is not None:
            self.scheduler.finish_request(request, ended)
            self.pending.append(self._output(request, [], []))

    def _matcher(self, params: SamplingParams, outputs: list[int]) -> Matcher:
        """A structured request's grammar, advanced past its resumed outputs (a resume, or a
        prefill instance's part of one): it continues where the request left off."""
        assert params.structured is not None
        matcher = self.grammars.matcher(params.structured)
        if not matcher.replay(outputs):
            raise InvalidRequestError("the resumed outputs do not match the structured output", "resume")
        return matcher

    def _checked_ids(self, ids: list[int], param: str) -> list[int]:
        """Token ids that are ints in the vocabulary (a float is no token id, and would reach the model
        as one); the prompt must not be empty."""
        if param == "prompt" and not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        what = "prompt token ids" if param == "prompt" else "resume.output_token_ids"
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise InvalidRequestError(f"{what} must be integers", param=param) from None
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{what} must be in [0, {vocab})", param=param)
        return ids

    def _resumed_end(self, request: Request, detok: Detokenizer, resume: Resume) -> RequestStatus | None:
        """Prime the detokenizer with a resumed request's outputs; the status they end it with, if any."""
        ended = request.check_stop_token()
        if resume.text_chars_sent is not None:
            min_tokens = request.params.min_tokens
            if detok.prime(request.output_token_ids, min_tokens, resume.text_chars_sent) and ended is None:
                ended = RequestStatus.FINISHED_STOPPED
            if resume.whole_text:
                detok.sent = 0
        if ended is not None and isinstance(request.handoff, ToDecode):
            raise InvalidRequestError("the resumed outputs end the request already", param="resume")
        return ended

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        self.pending.append(self._output(request, [], []))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self.pending) or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Collect the step on the GPU (if any), launch the next, then build the collected step's
        outputs while the new one runs. In a steady decode batch the next step is launched before
        the previous one is collected (ahead.py); without overlap (SchedulerConfig.overlap_outputs)
        each step is waited for right after its launch."""
        outputs, self.pending = self.pending, []
        if self.overlap and self._ahead_possible():
            return outputs + self._launch_ahead_then_collect()
        return outputs + self._collect_then_launch(had_outputs=bool(outputs))

    def _collect_then_launch(self, had_outputs: bool) -> list[RequestOutput]:
        """Collect the step in flight, apply what peers sent, schedule and launch the next step.
        First tokens that arrived with their KV go out at once, without waiting for a model step."""
        tokens = self._collect()
        arrived = self._apply(self._poll())
        launched = False
        if not arrived:
            launched = self._schedule_and_launch()
            if launched and not self.overlap:
                tokens += self._collect()
        self.idle = not (arrived or launched or had_outputs or tokens)
        return arrived + self._emit(tokens)

    def _schedule_and_launch(self) -> bool:
        """Schedule a step, ask prefill instances for the KV of requests just given blocks, and
        launch the step if it has work; False if it has none."""
        sched = self.scheduler.schedule()
        self._ask_for_kv(sched.reserved)
        if sched.is_empty:
            return False
        sched.chunks.sort(key=lambda c: c.num_tokens != 1)  # decodes first, as the runner wants
        self._launch(sched)
        return True

    def _ask_for_kv(self, reserved: list[Request]) -> None:
        """Requests whose blocks were just reserved for remote KV: send their Reserves, each for the
        blocks after the prefix this instance already had (its computed tokens, in full blocks)."""
        for r in reserved:
            assert self.connector is not None and isinstance(r.handoff, FromPrefill)
            params = asdict(r.params)
            cached = r.num_computed_tokens // self.block_manager.block_size
            self.connector.start_receive(
                r.request_id,
                r.handoff,
                r.token_ids,  # a resumed request's outputs too: the prefill computes them all
                params,
                r.block_ids[cached:],
                cached,
                num_output_tokens=r.num_output_tokens,
            )

    def _launch(self, sched: SchedulerOutput, ahead: InFlight | None = None) -> None:
        """Queue a step on the runner; what depends on the requests' state now is decided now."""
        start = self.clock.start()
        flight = InFlight(
            sched,
            self.runner.launch(
                sched.chunks, ahead.pending.token_ids if ahead else None, self._layer_hook(sched)
            ),
            [c.request for c in sched.chunks if c.samples],
            sum(
                max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start)
                for c in sched.chunks
            ),
        )
        flight.marks = self.clock.stop(start)
        self.in_flight = flight

    def _layer_hook(self, sched: SchedulerOutput) -> Callable[[int], None] | None:
        """Stream the KV of prompts this step completes, layer by layer (disagg/layer_stream.py)."""
        if self.connector is None or not self.config.disagg.stream_layers or not self.runner.single_rank:
            return None
        sends = self.connector.sends_kv
        finals = [_prompt_kv(c.request) for c in sched.chunks if c.samples and sends(c.request.handoff)]
        return self.connector.layer_hook(finals) if finals else None

    def _ahead_possible(self) -> bool:
        flight = self.in_flight
        if flight is None or not self.runner.single_rank:
            return False
        return can_run_ahead(flight, self.scheduler, self.connector)

    def _launch_ahead_then_collect(self) -> list[RequestOutput]:
        """Launch step N+1 behind step N (engine/ahead.py), then collect N and build its outputs."""
        flight = self.in_flight
        assert flight is not None
        self.scheduler.update_computed(flight.sched)
        flight.computed_applied = True
        self._launch(schedule_ahead(flight, self.scheduler), ahead=flight)
        self.num_steps_ahead += 1
        self.idle = False
        tokens = self._update(flight, self.clock.timed_wait(flight.pending.wait))
        if self.in_flight is not None:  # N's tokens are appended: the grammar masks of N+1 can be made
            self.in_flight.pending.release()
        return self._apply(self._poll()) + self._emit(tokens)

    def _collect(self) -> list[Token]:
        """Wait for the step in flight and apply its tokens to the requests (stop tokens, lengths,
        KV hand-off); what is left for the client (text, stop strings) is returned for _emit."""
        flight, self.in_flight = self.in_flight, None
        return self._update(flight, self.clock.timed_wait(flight.pending.wait)) if flight is not None else []

    def _update(self, flight: InFlight, results: list[SampleResult]) -> list[Token]:
        self.num_steps += 1
        self.clock.collected(flight.marks)
        self.num_prefill_tokens += flight.prefill_tokens
        if not flight.computed_applied:
            self.scheduler.update_computed(flight.sched)
        tokens = []
        for request, result in zip(flight.sampling, results, strict=True):
            if request.is_finished:  # stopped by a string or aborted while this step ran: not a token
                continue
            if self.connector is not None and self.connector.sends_kv(request.handoff):
                self._send_kv(request, result)  # the decode instance answers the client
            else:
                self._append(request, result)
                tokens.append((request, result))
        return tokens

    def _send_kv(self, request: Request, result: SampleResult) -> None:
        """A prefill request for a peer is computed: its KV and first token go there, and it ends here.
        If sending fails, only that transfer does (the decode instance is told)."""
        assert self.connector is not None and isinstance(request.handoff, ToDecode)
        try:
            self.connector.send_kv(_prompt_kv(request), _first_token(result), request.num_cached_tokens)
        except Exception as e:  # noqa: BLE001 - one transfer fails, not the engine
            logger.exception("sending the KV of %s failed", request.request_id)
            self.connector.failed_to_start(request.handoff, f"the prefill instance could not send KV: {e}")
        self._finish_silently(request, RequestStatus.FINISHED_STOPPED)

    def _append(self, request: Request, result: SampleResult) -> None:
        """A sampled token joins the request and advances its grammar; stop tokens and lengths end
        it here. The mask allowed the token, so a grammar refuses it only if that was broken."""
        request.append_token(result.token_id)
        if result.logprob is not None:
            request.logprobs.append(result.logprob)
        if request.matcher is not None and not request.matcher.accept(result.token_id):
            request.error = f"token {result.token_id} left the structured output's grammar"
            self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
            return
        status = request.check_stop_token()
        if status is not None:
            self.scheduler.finish_request(request, status)

    def _emit(self, tokens: list[Token]) -> list[RequestOutput]:
        """Detokenize appended tokens, end requests whose text hit a stop string, build outputs."""
        outputs = []
        for request, result in tokens:
            detok = self.detokenizers.get(request.request_id)
            if detok is None:  # ended without a word to the client meanwhile
                continue
            check_stop = request.num_output_tokens >= request.params.min_tokens  # as vLLM: none before
            try:
                stopped = detok.add_token(result.token_id, check_stop)
            except Exception as e:  # noqa: BLE001 - this request fails, not the engine
                logger.exception("detokenizing %s failed", request.request_id)
                error = f"the engine could not detokenize token {result.token_id}: {e}"
                outputs.append(self._error(request, error))
                continue
            if stopped and not request.is_finished:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            logprobs = [result.logprob] if result.logprob else []
            outputs.append(self._output(request, [result.token_id], logprobs))
        return outputs

    def _accept(self, request: Request, result: SampleResult) -> RequestOutput:
        """Append a sampled token, check every stop condition, and say what the client gets."""
        self._append(request, result)
        return self._emit([(request, result)])[0]

    def _finish_silently(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish_request(request, status)
        self.detokenizers.pop(request.request_id, None)

    def _poll(self) -> list[Action]:
        return self.connector.poll() if self.connector is not None else []

    def _apply(self, actions: list[Action]) -> list[RequestOutput]:
        """Apply what the connector reports; the outputs for clients it produces (first tokens, errors)."""
        outputs: list[RequestOutput] = []
        for action in actions:
            if isinstance(action, StartPrefill):
                self._start_prefill_for_peer(action)
            elif isinstance(action, Activate):
                outputs += self._activate(action)
            elif isinstance(action, Fail):
                outputs += self._fail(action)
            elif isinstance(action, Release):
                self.scheduler.release(action.request_id)
            elif isinstance(action, Cancel):
                request = self.scheduler.requests.get(action.request_id)
                if request is not None:
                    self._finish_silently(request, RequestStatus.FINISHED_ABORTED)
        return outputs

    def _activate(self, action: Activate) -> list[RequestOutput]:
        """A request's KV and first token arrived: it runs here from now on. A first token this
        engine cannot take fails the request alone."""
        request = self.scheduler.waiting_for_kv.get(action.request_id)
        if request is None:
            return []
        vocab = self.hf_config.vocab_size
        if not 0 <= action.first.token_id < vocab:
            return [self._error(request, f"prefill_failed: first token {action.first.token_id} >= {vocab}")]
        try:
            self.scheduler.activate(request)
            request.num_cached_tokens = min(action.num_cached_tokens, request.num_prompt_tokens)
            return [self._accept(request, _sample_result(action.first))]
        except Exception as e:  # noqa: BLE001 - this request fails, not the engine
            logger.exception("activating %s failed", request.request_id)
            return [self._error(request, f"prefill_failed: its first token could not be taken: {e}")]

    def _error(self, request: Request, error: str) -> RequestOutput:
        """End `request` with `error` (the client's answer); its text so far is not needed."""
        request.error = error
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
        self.detokenizers.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason=RequestStatus.FINISHED_ERROR.value,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            error=error,
        )

    def _fail(self, action: Fail) -> list[RequestOutput]:
        request = self.scheduler.requests.get(action.request_id)
        if request is None:
            return []
        # server/streaming.py maps the prefix to HTTP: 400 (no retry helps), 503 (a draining prefill:
        # retried elsewhere at no cost) or 502 (retried)
        kinds = {"invalid": "invalid_request", "draining": "prefill_draining"}
        kind = kinds.get(action.refused, "prefill_failed")
        request.error = f"{kind}: {action.reason}"
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
        return [self._output(request, [], [])]

    def _start_prefill_for_peer(self, action: StartPrefill) -> None:
        """A decode instance's Reserve: its prompt runs here as a local request. Parameters and prompt
        are checked as the HTTP edge's are (SamplingParams, add_request); a bad one is refused as
        invalid and never reaches a step."""
        assert self.connector is not None
        try:
            params = SamplingParams(**action.params)
            ids, n_out = action.prompt_token_ids, action.num_output_tokens
            prompt, outputs = ids[: len(ids) - n_out], tuple(ids[len(ids) - n_out :])
            resume = Resume(outputs, text_chars_sent=None) if n_out else None
            self.add_request(action.request_id, prompt, params, action.target, resume)
        except (PDServeError, TypeError, ValueError) as e:
            refused = "" if isinstance(e, OverloadedError) else "invalid"  # overloaded: another prefill may
            self.connector.failed_to_start(action.target, f"the prefill instance: {e}", refused)
        except Exception as e:  # noqa: BLE001 - this transfer fails, not the engine
            logger.exception("starting the prefill of %s failed", action.request_id)
            self.connector.failed_to_start(action.target, f"the prefill instance could not start it: {e}")

    def _output(self, request: Request, new_ids: list[int], logprobs: list[Logprob]) -> RequestOutput:
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
            kv_reused_tokens=self.scheduler.num_kv_reused_tokens,
            num_prefill_tokens=self.num_prefill_tokens,
            num_steps=self.num_steps,
            num_steps_ahead=self.num_steps_ahead,
            device_busy_seconds=self.clock.busy_s,
            host_wait_seconds=self.clock.wait_s,
            num_waiting_for_kv=len(self.scheduler.waiting_for_kv),
            tokens_in_flight=sum(r.num_tokens - r.num_computed_tokens for r in self._queued()),
            request_stages=self.scheduler.finished_times.snapshot(),
            **self._kv_stats(),
        )

    def load(self) -> dict[str, int]:
        """The load a router balances on; cheap enough to compute after every step."""
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_waiting_for_kv": len(self.scheduler.waiting_for_kv),
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "tokens_in_flight": sum(r.num_tokens - r.num_computed_tokens for r in self._queued()),
            "num_prefill_tokens": self.num_prefill_tokens,
        }

    def _queued(self) -> list[Request]:
        return list(self.scheduler.waiting) + self.scheduler.running

    def _kv_stats(self) -> dict[str, Any]:
        c = self.connector
        if c is None:
            return {}
        return {
            "kv_bytes_sent": c.bytes_sent,
            "kv_bytes_received": c.bytes_received,
            "kv_transfer_times": self.kv_times.add(c.take_transfer_seconds()),
            "kv_transfers_streamed": c.transfers_streamed,
            "peer_messages_dropped": c.messages_dropped,
        }


def _prompt_kv(request: Request) -> PromptKV:
    """A prefill request's computed prompt KV, as the connector sends it: its blocks after those the
    decode instance already caches, one per block it reserved."""
    target = request.handoff
    assert isinstance(target, ToDecode)
    first = target.cached_blocks
    return PromptKV(
        request.request_id, target, tuple(request.block_ids[first : first + len(target.block_ids)])
    )


def _first_token(result: SampleResult) -> FirstToken:
    lp = result.logprob
    if lp is None:
        return FirstToken(result.token_id)
    return FirstToken(result.token_id, lp.logprob, tuple(lp.top))


def _sample_result(first: FirstToken) -> SampleResult:
    if first.logprob is None:
        return SampleResult(first.token_id, None)
    return SampleResult(first.token_id, Logprob(first.token_id, first.logprob, list(first.top)))

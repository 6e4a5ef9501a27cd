"""`pdserve bench serve | sweep | plot`: arguments, and the steps from arguments to a result file.

    pdserve bench serve --base-url http://127.0.0.1:8000 --input-len 1100 --output-len 140 \\
        --num-prompts 200 --request-rate 4 --ignore-eos --slo ttft=2000,tpot=100 --output run.json
    pdserve bench serve ... --request-rate 2 --arrival constant --duration 60 --at-duration cut
    pdserve bench serve ... --max-concurrency 8 --duration 60 --prefix-salt auto
    pdserve bench sweep ... --rates 0.5,1,2,4,8 --output sweep.json
    pdserve bench plot run.json sweep.json --output-dir plots/

Works against any OpenAI-compatible server. Heavy imports (transformers, matplotlib) happen inside the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.arrivals import ARRIVALS, prompts_for_duration
from pdserve.bench.client import Target, first_model_id, normalize_base_url
from pdserve.bench.dataset import BenchRequest, load_tokenizer, random_requests
from pdserve.bench.definitions import definitions
from pdserve.bench.metrics import SLO, error_summary, format_table, parse_slo, per_request, summarize
from pdserve.bench.repeats import (
    DEFAULT_HISTORY,
    History,
    fingerprint,
    repeat_warnings,
    resolve_salt,
    unexplained_cache_hits,
)
from pdserve.bench.runner import AT_LIMIT, Load, RunOutcome, run_requests
from pdserve.bench.sweep import format_sweep, geometric_rates, parse_rates, prompts_for_rate, run_sweep
from pdserve.cli_types import int_at_least, positive_float
from pdserve.options import HelpFormatter

logger = logging.getLogger("pdserve.bench")
_positive = int_at_least(1)
_count = int_at_least(0)
LOG_LEVELS = ["debug", "info", "warning", "error"]
DEFAULT_NUM_PROMPTS = 200


def _slo(text: str) -> SLO:
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`pdserve bench` and its three subcommands."""
    bench = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (ours or another)",
        formatter_class=HelpFormatter,
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    serve = bench_sub.add_parser(
        "serve", help="one load run: latency, throughput, goodput", formatter_class=HelpFormatter
    )
    _add_load_args(serve)
    serve.add_argument(
        "--request-rate",
        type=positive_float,
        default=math.inf,
        help="requests a second (arrivals as --arrival says); inf: all at once",
    )
    serve.set_defaults(func=_bench_serve)
    sweep = bench_sub.add_parser(
        "sweep",
        help="load runs at increasing request rates, up to saturation",
        formatter_class=HelpFormatter,
    )
    _add_load_args(sweep)
    _add_sweep_args(sweep)
    sweep.set_defaults(func=_bench_sweep)
    plot = bench_sub.add_parser(
        "plot", help="PNG charts comparing result files", formatter_class=HelpFormatter
    )
    plot.add_argument("results", nargs="+", help="JSON files written by bench serve / bench sweep")
    plot.add_argument("--output-dir", default="bench-plots", help="where the PNG files go")
    plot.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="how much the log shows")
    plot.set_defaults(func=_bench_plot)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as Authorization: Bearer KEY (default: $OPENAI_API_KEY)",
    )
    p.add_argument("--model", default=None, help="model to ask for (default: first id of /v1/models)")
    p.add_argument("--served-model-name", default=None, help="the name sent in requests (default: --model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model if a dir, else ours)")
    _add_prompt_args(p)
    _add_arrival_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: every answer is output-len")
    p.add_argument("--temperature", type=float, default=0.0, help="of every request")
    p.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request")
    p.add_argument(
        "--slo",
        type=_slo,
        default=SLO(),
        help="latency targets for goodput, e.g. ttft=500,tpot=50 (ms; e2el too) (default: none)",
    )
    p.add_argument("--label", default=None, help="a name for this run in the JSON and the plots")
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="how much the log shows")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    """What the prompts are, and the record that warns when a server has seen them."""
    p.add_argument("--dataset", choices=["random"], default="random", help="random: token-id prompts")
    p.add_argument("--input-len", type=_positive, default=1100, help="prompt tokens (after the prefix)")
    p.add_argument("--output-len", type=_positive, default=140, help="max_tokens of each request")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    p.add_argument("--prefix-len", type=_count, default=0, help="tokens of a prefix shared by all prompts")
    p.add_argument(
        "--num-prompts",
        type=_positive,
        default=None,
        help=f"requests in the run (default: {DEFAULT_NUM_PROMPTS}, or with --duration and a finite rate, "
        "enough to arrive for the whole duration)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument(
        "--prefix-salt",
        default=None,
        help="mixed into the prompts' seed: other prompts of the same sizes, which no earlier run sent "
        "(so the server's prefix cache cannot answer them); 'auto': a fresh salt each run",
    )
    p.add_argument(
        "--history",
        default=DEFAULT_HISTORY,
        help="file recording which prompts went to which server, to warn on a repeat ('' : none)",
    )


def _add_arrival_args(p: argparse.ArgumentParser) -> None:
    """When requests are sent: arrival times, the duration bound, the concurrency cap."""
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson", help="arrival times at a finite rate")
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        help="seconds: send nothing after this (default: send every prompt)",
    )
    p.add_argument(
        "--at-duration",
        choices=AT_LIMIT,
        default="wait",
        help="requests in flight at --duration: wait for them, or cut them (cancelled, counted apart)",
    )
    p.add_argument(
        "--max-concurrency",
        type=_positive,
        default=None,
        help="requests in flight at most (default: no limit)",
    )


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default=None, help="comma-separated req/s, e.g. 0.5,1,2,4 (overrides the rest)")
    p.add_argument("--rate-start", type=positive_float, default=1.0, help="the first rate, req/s")
    p.add_argument("--rate-factor", type=float, default=2.0, help="each rate is the last one times this")
    p.add_argument("--max-rates", type=_positive, default=6, help="rates to run at most")
    p.add_argument("--min-attainment", type=float, default=0.5, help="stop below this SLO attainment")
    p.add_argument(
        "--arrival-seconds",
        type=positive_float,
        default=None,
        help="at least this long of arrivals per rate: num-prompts grows to rate x seconds where larger",
    )


@dataclass(frozen=True)
class Setup:
    """What every run of one command shares: where to send, and the tokenizer that sizes prompts."""

    target: Target
    tokenizer_path: str
    tokenizer: Any


def _setup(args: argparse.Namespace) -> Setup:
    base_url = normalize_base_url(args.base_url)
    model = args.model or first_model_id(base_url, args.api_key)
    target = Target(
        base_url=base_url,
        endpoint=args.endpoint,
        model=args.served_model_name or model,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout=args.request_timeout,
    )
    path = _tokenizer_path(args.tokenizer, model)
    return Setup(target, path, load_tokenizer(path))


def _tokenizer_path(tokenizer: str | None, model: str) -> str:
    from pdserve.models.prepare import DEFAULT_MODEL_NAME, resolve_model

    if tokenizer:
        return resolve_model(tokenizer) if tokenizer.endswith(".gguf") else tokenizer
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if Path(model).name != DEFAULT_MODEL_NAME:
        logger.warning(
            "sizing prompts with %s's tokenizer; pass --tokenizer for %s", DEFAULT_MODEL_NAME, model
        )
    return resolve_model(None)


def num_prompts(args: argparse.Namespace, rate: float) -> int:
    """--num-prompts, or enough to arrive for all of --duration at `rate`, or the default."""
    if args.num_prompts is not None:
        return int(args.num_prompts)
    if args.duration is not None:
        return prompts_for_duration(rate, args.duration, args.arrival) or DEFAULT_NUM_PROMPTS
    return DEFAULT_NUM_PROMPTS


def _requests(
    args: argparse.Namespace, setup: Setup, n: int, seed: int, salt: str | None
) -> list[BenchRequest]:
    return random_requests(
        setup.tokenizer,
        n,
        args.input_len,
        args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        seed=seed,
        salt=salt,
    )


def run_once(args: argparse.Namespace, setup: Setup, rate: float, seed: int) -> dict[str, Any]:
    """One load run at `rate` on prompts made from `seed`: the result dict `bench serve` writes."""
    salt = resolve_salt(args.prefix_salt)
    n = num_prompts(args, rate)
    requests = _requests(args, setup, n, seed, salt)
    target, prints = setup.target, fingerprint(requests)
    history = History.at(args.history)
    earlier = history.earlier(target.base_url, target.model, prints) if history else None
    load = Load(rate, args.arrival, args.max_concurrency, args.duration, args.at_duration)
    outcome = asyncio.run(run_requests(target, requests, load, seed, progress=not args.disable_tqdm))
    if history:
        history.record(target.base_url, target.model, prints, args.label)
    result = _header(args, setup)
    result.update(request_rate=_json_rate(rate), seed=seed, prefix_salt=salt, prompts_fingerprint=prints)
    result.update(_load_fields(load, outcome, n))
    result.update(summarize(outcome.results, outcome.duration, args.slo))
    result.update(per_request(outcome.results, outcome.start))
    hits = unexplained_cache_hits(outcome.results, args.prefix_len)
    result["warnings"] = repeat_warnings(earlier, hits, result["completed"]) + _limit_warnings(load, outcome)
    result["definitions"] = definitions()
    return result


def _load_fields(load: Load, outcome: RunOutcome, n: int) -> dict[str, Any]:
    """How the run was offered and, with a duration limit, what the limit did."""
    return {
        "num_prompts": n,
        "arrival": "all at once" if math.isinf(load.rate) else load.arrival,
        "duration_limit": load.duration,
        "at_duration": load.at_limit if load.duration is not None else None,
        "sent": len(outcome.results),
        "not_sent": outcome.not_sent,
        "drained": outcome.drained,
    }


def _limit_warnings(load: Load, outcome: RunOutcome) -> list[str]:
    if not outcome.ran_out:
        return []
    return [
        f"all {len(outcome.results)} prompts were sent before the {load.duration:g} s limit: the run "
        "ended with them, not with the limit (raise --num-prompts)"
    ]


def _header(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    t = setup.target
    return {
        "label": args.label,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "backend": "openai-chat" if t.endpoint == "chat" else "openai",
        "base_url": t.base_url,
        "endpoint": t.endpoint,
        "model_id": t.model,
        "tokenizer_id": setup.tokenizer_path,
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "max_concurrency": args.max_concurrency,
        "slo": args.slo.as_dict(),
        "args": _json_args(args),
    }


def _json_rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _json_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key == "func" or key == "api_key":
            continue
        if isinstance(value, SLO):
            value = value.as_dict()
        elif isinstance(value, float) and math.isinf(value):
            value = "inf"
        out[key] = value
    return out


def _print_result(result: dict[str, Any], title: str) -> None:
    print(format_table(result, title))
    for warning in result.get("warnings", ()):
        print(f"WARNING: {warning}")
    errors = error_summary(result["errors"])
    if errors:
        print(f"errors (most frequent first):\n{errors}")
    sys.stdout.flush()


def _write(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        print(f"wrote {path}")


def _start(args: argparse.Namespace) -> Setup | None:
    """The shared setup, or None after logging why it failed (no server, no tokenizer...)."""
    import httpx

    try:
        return _setup(args)
    except (OSError, ValueError, KeyError, httpx.HTTPError) as e:
        logger.error("bench: %s: %s", type(e).__name__, e)
        return None


def _bench_serve(args: argparse.Namespace) -> int:
    setup = _start(args)
    if setup is None:
        return 2
    result = run_once(args, setup, args.request_rate, args.seed)
    _print_result(result, "Serving Benchmark Result")
    _write(args.output, result)
    return 0 if result["completed"] or result["cut"] else 1  # 1: every request sent failed


def _bench_sweep(args: argparse.Namespace) -> int:
    try:
        rates = (
            parse_rates(args.rates)
            if args.rates
            else geometric_rates(args.rate_start, args.rate_factor, args.max_rates)
        )
    except ValueError as e:
        logger.error("bench sweep: %s", e)
        return 2
    setup = _start(args)
    if setup is None:
        return 2

    def run_at(rate: float, index: int) -> dict[str, Any]:
        n = prompts_for_rate(rate, num_prompts(args, rate), args.arrival_seconds)
        at_rate = argparse.Namespace(**{**vars(args), "num_prompts": n})
        result = run_once(at_rate, setup, rate, args.seed + index)  # new prompts: no prefix-cache help
        _print_result(result, f"{_json_rate(rate)} req/s")
        return result

    sweep = run_sweep(run_at, rates, args.min_attainment)
    print(format_sweep(sweep))
    head = _header(args, setup)
    _write(args.output, {"kind": "sweep", **head, "rates": [_json_rate(r) for r in rates], **sweep})
    return 0 if any(r["completed"] for r in sweep["results"]) else 1


def _bench_plot(args: argparse.Namespace) -> int:
    from pdserve.bench.plot import make_plots

    try:
        written = make_plots(args.results, args.output_dir)
    except (OSError, ValueError, KeyError) as e:
        logger.error("bench plot: %s: %s", type(e).__name__, e)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0

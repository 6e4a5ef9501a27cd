"""`pdserve profile | simulate | plan`: arguments, and the steps from arguments to a JSON file.

    pdserve profile --model qwen2.5-7b --load-format dummy --device cuda --out profile_7b.json
    pdserve simulate --profile profile.json --layout pd:1:1 --workload 1100:140 --request-rate 2
    pdserve plan --gpus 8 --profile p_tp1.json --profile p_tp2.json --workload 1100:140 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 50
    pdserve plan --gpus 4 --profile profile.json --from-router http://router:8000 --slo-tpot-ms 50

Heavy imports (torch, the engine) happen only in `profile`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.bench.metrics import SLO, format_table, parse_slo
from pdserve.cli_types import int_at_least, positive_float
from pdserve.options import HelpFormatter

logger = logging.getLogger("pdserve.planning")
LOG_LEVELS = ["debug", "info", "warning", "error"]
_positive = int_at_least(1)


def add_planning_parsers(sub: argparse._SubParsersAction) -> None:
    _add_profile(sub)
    _add_simulate(sub)
    _add_plan(sub)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="time this machine's engine step by step: a profile for simulate/plan",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        "--model-shape",
        dest="model",
        default=None,
        help="model directory or shape (pdserve/model_configs: qwen2.5-7b...); default: ours",
    )
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto", help="dummy: random weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (a shape has none: as pdserve serve's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if there is one)")
    p.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size of the instance")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-num-seqs", type=_positive, default=None, help="as pdserve serve's")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=None, help="as pdserve serve's")
    p.add_argument("--num-blocks", type=_positive, default=None, help="KV pool blocks (default: as serve)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="as pdserve serve's")
    p.add_argument("--quick", action="store_true", help="a few points only (tests, smoke runs)")
    for flag, what in GRID_FLAGS.items():
        p.add_argument(
            flag, type=_int_list, default=None, metavar="N,N,...", help=f"{what} (default: by device)"
        )
    p.add_argument(
        "--front",
        action="store_true",
        help="also time the front (tokenization; HTTP: a pdserve serve like this engine, started after it)",
    )
    p.add_argument("--front-url", default=None, help="time the HTTP front against this running server")
    p.add_argument(
        "--front-busy-streams",
        type=int,
        default=4,
        help="the front's busy figure: measured again while this many streams decode (0: not measured)",
    )
    p.add_argument("--out", default="profile.json", help="where the profile JSON goes")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="how much the log shows")
    p.set_defaults(func=_profile)


def _add_workload_args(p: argparse.ArgumentParser, rate: bool) -> None:
    p.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="FILE",
        help="a profile (pdserve profile); once per TP size the layouts may use",
    )
    p.add_argument("--workload", default=None, metavar="IN:OUT", help="prompt:answer tokens, e.g. 1100:140")
    p.add_argument("--input-len", type=_positive, default=1100, help="prompt tokens")
    p.add_argument("--output-len", type=_positive, default=140, help="answer tokens")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    p.add_argument("--burstiness", type=positive_float, default=1.0, help="1: Poisson; below 1: burstier")
    p.add_argument("--num-prompts", type=_positive, default=200, help="requests simulated (per rate)")
    p.add_argument("--seed", type=int, default=0, help="seeds the lengths and the arrival times")
    if rate:
        p.add_argument(
            "--request-rate", type=positive_float, default=math.inf, help="req/s; inf: all at once"
        )
        p.add_argument("--trace", default=None, help="JSON (lines) of {arrival, input_len, output_len}")
    p.add_argument("--policy", default="round_robin", help="the router's policy (router/policies.py)")
    p.add_argument("--transport", default=None, help="the profile's KV transport (default: its fastest)")
    p.add_argument("--max-num-seqs", type=_positive, default=None, help="default: the profile's")
    p.add_argument("--max-num-batched-tokens", type=_positive, default=None, help="default: the profile's")
    p.add_argument(
        "--visible-fraction",
        default="1",
        help="chance a token has text (TTFT counts to the first that has): 1 for real weights; "
        "'profile': the profile's front, measured with its dummy weights",
    )
    p.add_argument("--output", default=None, help="write the result JSON here")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="how much the log shows")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a layout under a workload, priced by a profile",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--layout", default="colocated:1", help="colocated:K or pd:P:D, optionally @tpN or @tpP,D")
    _add_workload_args(p, rate=True)
    p.add_argument("--slo", type=_slo, default=SLO(), help="ttft=500,tpot=50 (ms) for goodput")
    p.add_argument("--label", default=None, help="a name for this run in the JSON and the plots")
    p.set_defaults(func=_simulate)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="the best layout of N GPUs for a workload under SLOs (simulated)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--gpus", type=_positive, required=True, help="GPUs to lay out")
    _add_workload_args(p, rate=False)
    p.add_argument("--slo-ttft-ms", type=positive_float, default=None, help="time to first token limit")
    p.add_argument("--slo-tpot-ms", type=positive_float, default=None, help="time per output token limit")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--from-router", default=None, metavar="URL", help="plan for what this router observed")
    p.add_argument("--api-key", default=None, help="the router's API key (for --from-router)")
    p.set_defaults(func=_plan)


GRID_FLAGS = {
    "--prefill-tokens": "prompt chunk sizes to time",
    "--prefill-cached": "cached prefix lengths to time them after",
    "--decode-batch": "decode batch sizes to time",
    "--decode-context": "context lengths per sequence of those batches",
    "--mixed-tokens": "prompt chunk sizes to time beside decodes (a mixed step)",
    "--mixed-batch": "decode batch sizes beside them",
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 0 or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"want ascending integers >= 0, e.g. 1,4,16: {text!r}")
    return values


def _slo(text: str) -> SLO:
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- the commands ---------------------------------------------------------------------------------


def _profile(args: argparse.Namespace) -> int:
    from pdserve import LLM
    from pdserve.models.prepare import resolve_model
    from pdserve.planning.profiler import CPU, CUDA, QUICK, measure

    device = args.device or _default_device()
    options: dict[str, Any] = {"device": device, "load_format": args.load_format, "dtype": args.dtype}
    options.update(tensor_parallel_size=args.tp, gpu_memory_utilization=args.gpu_memory_utilization)
    for name in ("tokenizer", "max_num_seqs", "max_num_batched_tokens", "num_blocks"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if device == "cpu":
        options["overlap_outputs"] = False
    try:
        llm = LLM(resolve_model(args.model), **options)
    except (FileNotFoundError, ValueError) as e:
        logger.error("profile: %s", e)
        return 2
    points = QUICK if args.quick else CUDA if device.startswith("cuda") else CPU
    given = {
        f.removeprefix("--").replace("-", "_"): getattr(args, f.removeprefix("--").replace("-", "_"))
        for f in GRID_FLAGS
    }
    points = replace(points, **{k: v for k, v in given.items() if v is not None})
    tokenizer = llm.engine.tokenizer
    dummy_vocab = int(llm.engine.hf_config.vocab_size) if args.load_format == "dummy" else None
    try:
        profile = measure(llm, points)
    finally:
        llm.close()
    if args.front or args.front_url:
        profile = replace(profile, front=_front(args, options, tokenizer, dummy_vocab))
    profile.meta["source"] = Path(args.out).name
    profile.save(args.out)
    print(f"wrote {args.out}: KV pool {profile.num_blocks} blocks x {profile.block_size} tokens")
    return 0


def _front(args: argparse.Namespace, options: dict[str, Any], tokenizer: Any, dummy_vocab: int | None) -> Any:
    """The profile's front section: against --front-url, or a server started like the engine."""
    from pdserve.planning.front_probe import measure_front
    from pdserve.planning.front_server import running_server

    kwargs: dict[str, Any] = {"dummy_vocab": dummy_vocab, "busy_streams": args.front_busy_streams}
    if args.front_url:
        return measure_front(tokenizer, args.front_url, **kwargs)
    with running_server({**options, "model": args.model, "tp": args.tp}) as url:
        return measure_front(tokenizer, url, **kwargs)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(args: argparse.Namespace) -> tuple[dict[int, Any], Any, Any]:
    """(profiles by TP, workload, simulation options) from the shared arguments."""
    from pdserve.planning.profile import Profile
    from pdserve.planning.simulator import SimOptions
    from pdserve.planning.workload import Workload

    profiles = {}
    for path in args.profile:
        profile = Profile.load(path)
        profile.meta.setdefault("source", Path(path).name)
        profiles[profile.tp] = profile
    if args.workload:
        n_in, _, n_out = args.workload.partition(":")
        args.input_len, args.output_len = int(n_in), int(n_out)
    rate = getattr(args, "request_rate", 1.0)
    work = Workload(
        args.input_len, args.output_len, args.range_ratio, rate, args.burstiness, args.num_prompts, args.seed
    )
    visible = args.visible_fraction
    if visible == "profile":
        visible = next(iter(profiles.values())).front.visible_fraction
    options = SimOptions(
        args.policy,
        args.transport,
        args.max_num_seqs,
        args.max_num_batched_tokens,
        seed=args.seed,
        visible_fraction=float(visible),
    )
    return profiles, work, options


def _simulate(args: argparse.Namespace) -> int:
    from pdserve.planning.layout import parse_layout
    from pdserve.planning.report import sim_result
    from pdserve.planning.simulator import Simulator
    from pdserve.planning.workload import load_trace

    try:
        profiles, work, options = _inputs(args)
        layout = parse_layout(args.layout)
        specs = load_trace(args.trace) if args.trace else work.requests()
        run = Simulator(layout, profiles, options).run(specs)
    except (OSError, ValueError, KeyError) as e:
        logger.error("simulate: %s: %s", type(e).__name__, e)
        return 2
    result = sim_result(run, args.slo, layout, profiles, work.rate, args.label)
    result["workload"] = work.describe() if not args.trace else {"trace": args.trace}
    print(format_table(result, f"Simulated: {layout}"))
    _write(args.output, result)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pdserve.planning.planner import plan, verdict

    try:
        profiles, work, options = _inputs(args)
        if args.from_router:
            work = _observed(args.from_router, args.api_key, args.num_prompts, args.seed)
    except (OSError, ValueError, KeyError) as e:
        logger.error("plan: %s: %s", type(e).__name__, e)
        return 2
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    ranked = plan(args.gpus, profiles, work, slo, options, args.attainment)
    if not ranked:
        logger.error("plan: no layout of %d GPUs fits the profiles' TP sizes %s", args.gpus, sorted(profiles))
        return 2
    print(format_plan(ranked, slo, args.attainment))
    print(verdict(ranked))
    _write(
        args.output,
        {
            "kind": "plan",
            "simulated": True,
            "gpus": args.gpus,
            "slo": slo.as_dict(),
            "attainment": args.attainment,
            "workload": work.describe(),
            "verdict": verdict(ranked),
            "ranked": [c.summary() for c in ranked],
            "best": ranked[0].predicted,
        },
    )
    return 0


def _observed(url: str, api_key: str | None, num_requests: int, seed: int) -> Any:
    import httpx

    from pdserve.planning.workload import from_router

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    answer = httpx.get(url.rstrip("/").removesuffix("/v1") + "/pd/workload", headers=headers, timeout=10)
    answer.raise_for_status()
    return from_router(answer.json(), num_requests, seed)


def format_plan(ranked: list[Any], slo: SLO, attainment: float) -> str:
    limits = ", ".join(f"{k.removesuffix('_ms')} <= {v:g} ms" for k, v in slo.as_dict().items()) or "none"
    rows = [f"Layouts by goodput per GPU ({attainment:.0%} of requests within SLO: {limits}); simulated"]
    rows.append(
        f"{'layout':<18}{'goodput req/s':>14}{'per GPU':>9}{'TTFT mean/p90 ms':>20}{'TPOT mean/p90 ms':>20}"
    )
    for i, c in enumerate(ranked):
        p = c.predicted
        mark = "  <- best" if i == 0 else "  <- runner-up" if i == 1 else ""
        ttft = f"{_ms(p['mean_ttft_ms'])}/{_ms(p['p90_ttft_ms'])}"
        tpot = f"{_ms(p['mean_tpot_ms'])}/{_ms(p['p90_tpot_ms'])}"
        rows.append(f"{str(c.layout):<18}{c.goodput:>14.3f}{c.per_gpu:>9.3f}{ttft:>20}{tpot:>20}{mark}")
    return "\n".join(rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _write(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        print(f"wrote {path}")
        sys.stdout.flush()

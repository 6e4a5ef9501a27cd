"""The planner against real runs on CPU: 1P1D vs 2 colocated, each instance pinned to one core.

    python benchmarks/planner_validation.py --rates 0.2,0.4,0.8 --num-prompts 16 --out-dir results/planner

1. A CPU profile of the default model on one core (`taskset -c 0 pdserve profile`), unless --profile.
2. Each layout for real: two `pdserve serve` instances (`taskset -c 0` and `-c 1`: prefill + decode,
   or two colocated) behind a `pdserve router` (round_robin), and `pdserve bench serve` at each rate
   (random prompts of --input-len tokens, --output-len tokens each, EOS ignored).
3. The same runs simulated from the profile: the measured run's own arrival times and prompt lengths
   as the trace, so both sides see the same requests.
4. Predicted vs measured mean and p90 TTFT and TPOT: OUT_DIR/validation.md (a table), validation.json,
   predicted_vs_measured.png.

The router and the load generator are not pinned: on a 2-core machine they share the instances' cores.

Against runs measured elsewhere (`bench serve` or `bench sweep` JSON; the layout read off the label:
1p1d -> pd:1:1, colocated2 -> colocated:2), with a profile of that hardware, nothing is started:

    python benchmarks/planner_validation.py --profile profile_7b.json --out-dir val-7b --against \
        docs/bench/h200x2/rerun-7b/qwen2.5-7b-1p1d.json \
        docs/bench/h200x2/rerun-7b/qwen2.5-7b-colocated2.json

A profile without a front section (profile.Front: HTTP, tokenization, the share of tokens with text)
can take one measured elsewhere: --front FILE (a front section, or a profile with one), or
--measure-front FILE: measured on this machine first (a CPU `pdserve serve` of the default model for
the HTTP part; --front-tokenizer for tokenization and, with --dummy-vocab, the share of a dummy-weight
model's ids with text), written to FILE. Each row also shows the error of the simulator without the
front, without launching ahead and counting every token as text ("before"):

    python benchmarks/planner_validation.py --profile docs/bench/h100/profile-qwen2.5-7b-2026-12-07.json \
        --out-dir docs/bench/h100/planner-7b-2026-12-07 --front-tokenizer .whl/tokenizer \
        --dummy-vocab 152064 --front-router \
        --measure-front docs/bench/h100/planner-7b-2026-12-07/front-cpu.json \
        --against docs/bench/h100/planner-7b-2026-12-07/measured-colocated1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import start, stop, wait_healthy  # benchmarks/ is sys.path[0]

from pdserve.bench.metrics import SLO
from pdserve.planning.layout import parse_layout
from pdserve.planning.profile import Front, Profile
from pdserve.planning.report import sim_result
from pdserve.planning.simulator import SimOptions, Simulator
from pdserve.planning.workload import RequestSpec

PY = [sys.executable, "-m", "pdserve.cli"]
METRICS = ("mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "p90_tpot_ms")


def pinned(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd]


def launch(layout: str, port: int, out: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """Two instances, one core each, and a router in front of them on `port`."""
    roles = ["prefill", "decode"] if layout.startswith("pd") else ["both", "both"]
    procs, urls = [], []
    for core, role in enumerate(roles):
        p = port + 10 + 10 * core
        cmd = [*PY, "serve", "--port", str(p), "--role", role, "--log-level", "warning"]
        procs.append(start(pinned(core, cmd), out / f"{layout.replace(':', '_')}-{core}-{role}.log", env))
        urls.append(f"http://127.0.0.1:{p}")
    for url, proc in zip(urls, procs, strict=True):
        wait_healthy(url, [proc])
    router = [*PY, "router", "--port", str(port), "--log-level", "warning", "--health-interval", "0.5"]
    router += ["--prefill", urls[0], "--decode", urls[1]] if roles[0] == "prefill" else ["--instance", *urls]
    procs.append(start(router, out / f"{layout.replace(':', '_')}-router.log", env))
    wait_healthy(f"http://127.0.0.1:{port}", procs)
    return procs


def measure(layout: str, args: argparse.Namespace, out: Path, env: dict[str, str]) -> list[Path]:
    procs = launch(layout, args.port, out, env)
    files = []
    try:
        for i, rate in enumerate(args.rates):
            path = out / f"measured-{layout.replace(':', '_')}-{rate:g}.json"
            cmd = [*PY, "bench", "serve", "--base-url", f"http://127.0.0.1:{args.port}"]
            cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos"]
            cmd += ["--num-prompts", str(args.num_prompts), "--request-rate", str(rate), "--seed", str(i)]
            cmd += ["--label", f"measured {layout}", "--output", str(path), "--disable-tqdm"]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            files.append(path)
            print(f"measured {layout} at {rate:g} req/s", flush=True)
    finally:
        stop(procs)
    return files


def layout_of(label: str) -> str:
    """'qwen2.5-7b-1p1d' -> 'pd:1:1', 'colocated2' -> 'colocated:2' (pd_vs_colocated.py's labels)."""
    pd = re.search(r"(\d+)p(\d+)d", label)
    if pd:
        return f"pd:{pd.group(1)}:{pd.group(2)}"
    colocated = re.search(r"colocated:?(\d+)", label)
    if colocated:
        return f"colocated:{colocated.group(1)}"
    raise ValueError(f"no layout in the label {label!r}")


def runs_in(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(layout, one run's result) for each run of a bench serve or sweep file."""
    data = json.loads(path.read_text())
    layout = layout_of(str(data.get("label") or path.stem))
    return [(layout, r) for r in data.get("results", [data])]


def simulate_like(
    measured: dict[str, Any], layout: str, profile: Profile, transport: str | None, plain: bool = False
) -> dict[str, Any]:
    """The measured run's requests (arrivals, prompt lengths as the server counted them), simulated;
    `plain`: as the simulator did before the front (no front, no launching ahead, all tokens text)."""
    inputs = [u or n for u, n in zip(measured["usage_input_lens"], measured["input_lens"], strict=True)]
    specs = [
        RequestSpec(t, n, measured["args"]["output_len"])
        for t, n in zip(measured["start_times"], inputs, strict=True)
    ]
    lay = parse_layout(layout)
    # the measured runs' tokens: dummy weights count as text only where their tokenizer has some
    options = SimOptions(transport=transport, visible_fraction=profile.front.visible_fraction)
    if plain:
        profile = replace(profile, front=Front())
        options = replace(options, launch_ahead=False, visible_fraction=1.0)
    run = Simulator(lay, {profile.tp: profile}, options).run(specs)
    result = sim_result(
        run, SLO(), lay, {profile.tp: profile}, measured["request_rate"], f"simulated {layout}"
    )
    result["duration"] = max(result["duration"], 1e-9)
    return result


def row(
    layout: str, measured: dict[str, Any], predicted: dict[str, Any], before: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"layout": layout, "rate": measured["request_rate"]}
    for key in METRICS:
        m, p, b = measured[key], predicted[key], before[key]
        out[key] = {
            "measured": m,
            "predicted": p,
            "error": (p - m) / m if m else None,
            "before": b,
            "error_before": (b - m) / m if m else None,
        }
    return out


def cell(v: dict[str, Any]) -> str:
    return f"{v['measured']:.1f} / {v['predicted']:.1f} ({v['error']:+.0%}; {v['error_before']:+.0%})"


def table(rows: list[dict[str, Any]]) -> str:
    head = "| layout | req/s | " + " | ".join(f"{k} meas / pred (err; before)" for k in METRICS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(METRICS)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['rate']:g} | " + " | ".join(cell(r[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4.2))
    for ax, key in zip(axes, METRICS, strict=True):
        for layout, marker in zip(sorted({r["layout"] for r in rows}), "os^vD*", strict=False):
            pts = [(r[key]["measured"], r[key]["predicted"]) for r in rows if r["layout"] == layout]
            old = [(r[key]["measured"], r[key]["before"]) for r in rows if r["layout"] == layout]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=layout)
                ax.scatter(
                    *zip(*old, strict=True),
                    marker=marker,
                    facecolors="none",
                    edgecolors="grey",
                    label=f"{layout} before",
                )
        top = max(max(r[key]["measured"], r[key]["predicted"], r[key]["before"]) for r in rows) * 1.1
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.fill_between([0, top], [0, top * 0.85], [0, top * 1.15], color="grey", alpha=0.15, label="+-15%")
        ax.set(xlabel="measured (ms)", ylabel="predicted (ms)", title=key, xlim=(0, top), ylim=(0, top))
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def profile_cpu(out: Path, env: dict[str, str]) -> Path:
    """The default model's CPU profile on one core (the instances' conditions)."""
    path = out / "profile_cpu.json"
    cmd = [*PY, "profile", "--device", "cpu", "--out", str(path), "--prefill-tokens", "16,64,128,256"]
    cmd += ["--prefill-cached", "0,64", "--decode-batch", "1,2,4,8", "--decode-context", "64,160"]
    subprocess.run(pinned(0, cmd), check=True, env=env)
    return path


def measure_runs(
    layout: str, args: argparse.Namespace, out: Path, env: dict[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    return [(layout, json.loads(p.read_text())) for p in measure(layout, args, out, env)]


def model_note(profile: Profile, args: argparse.Namespace) -> str:
    """What the predictions were made with, above the table."""
    f = profile.front
    busy = f"{f.busy_fixed_s * 1e3:.2f} ms" if f.busy_fixed_s is not None else "not measured (as idle)"
    where = args.front or args.measure_front or "the profile"
    lines = [
        f"Predicted from `{profile.meta.get('source', profile.model)}` ({profile.meta.get('device', '?')}):",
        f"- front (from {where}): {f.fixed_s * 1e3:.2f} ms a request + {f.per_token_s * 1e6:.2f} us a prompt"
        f" token; with the engine stepping: {busy}; tokens with text: {f.visible_fraction:.3f}",
        "- mixed steps: "
        + ("measured (the profile's mixed grid)" if profile.mixed else "composed (costs.py)"),
        f"- launching ahead: {'off' if profile.meta.get('device', 'cpu') == 'cpu' else 'on'} (its device)",
        "- before: the same simulator without the front, without launching ahead, every token text",
    ]
    return "\n".join(lines)


def front_for(args: argparse.Namespace, env: dict[str, str]) -> Front:
    """The front section --front names, or one measured here (--measure-front), written there."""
    if args.front:
        data = json.loads(Path(args.front).read_text())
        return Front.from_json(data.get("front", data))
    from transformers import AutoTokenizer

    from pdserve.models.prepare import resolve_model
    from pdserve.planning.front_probe import measure_front

    tokenizer = AutoTokenizer.from_pretrained(args.front_tokenizer or resolve_model(None))
    port = args.port + 1
    instance = f"http://127.0.0.1:{port}"
    procs = [
        start([*PY, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning"], None, env)
    ]
    try:
        wait_healthy(instance, procs)
        url = instance
        if args.front_router:  # as the measured runs were served: `pdserve up` puts its router in front
            url = f"http://127.0.0.1:{port + 1}"
            router = [
                *PY,
                "router",
                "--port",
                str(port + 1),
                "--log-level",
                "warning",
                "--instance",
                instance,
            ]
            procs.append(start(router, None, env))
            wait_healthy(url, procs)
        front = measure_front(
            tokenizer,
            url,
            requests=30,
            dummy_vocab=args.dummy_vocab,
            metrics_url=instance,
            busy_streams=args.front_busy_streams,
        )
    finally:
        stop(procs)
    path = Path(args.measure_front)
    note = "measured on this machine's CPU with the default model's server (HTTP) and the served tokenizer"
    note += ", through a pdserve router" if args.front_router else ""
    path.write_text(
        json.dumps({**front.to_json(), "note": note, "machine": platform.node()}, indent=1) + "\n"
    )
    return front


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.4, 0.8])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--layouts", default="colocated:2,pd:1:1")
    ap.add_argument("--profile", default=None, help="a CPU profile to use instead of measuring one")
    ap.add_argument("--port", type=int, default=18700)
    ap.add_argument("--out-dir", default="results/planner")
    ap.add_argument("--against", nargs="+", default=None, help="measured bench JSON files: start nothing")
    ap.add_argument("--front", default=None, help="a front section (or a profile with one) to use")
    ap.add_argument("--measure-front", default=None, help="measure a front here first, write it there")
    ap.add_argument("--front-tokenizer", default=None, help="the served tokenizer (default: the model's)")
    ap.add_argument("--dummy-vocab", type=int, default=None, help="the dummy-weight model's vocabulary")
    ap.add_argument("--front-router", action="store_true", help="measure the front through a router")
    ap.add_argument(
        "--front-busy-streams", type=int, default=0, help="streams decoding for the busy figure (0: none)"
    )
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PDSERVE_CLUSTER_SECRET": secrets.token_urlsafe(32)}
    if args.against:
        profile = Profile.load(args.profile)
        measured = [run for path in args.against for run in runs_in(Path(path))]
        transport = None  # the profile's fastest: what `auto` picks between two GPUs of one host
    else:
        profile = Profile.load(args.profile or profile_cpu(out, env))
        measured = [run for layout in args.layouts.split(",") for run in measure_runs(layout, args, out, env)]
        transport = "tcp"
    if args.measure_front or args.front:
        profile = replace(profile, front=front_for(args, env))
    rows = []
    for i, (layout, result) in enumerate(measured):
        predicted = simulate_like(result, layout, profile, transport)
        (out / f"simulated-{i}-{layout.replace(':', '_')}-{result['request_rate']}.json").write_text(
            json.dumps(predicted, indent=1)
        )
        rows.append(row(layout, result, predicted, simulate_like(result, layout, profile, transport, True)))
    (out / "validation.json").write_text(json.dumps(rows, indent=1))
    (out / "validation.md").write_text(model_note(profile, args) + "\n\n" + table(rows) + "\n")
    plot(rows, out / "predicted_vs_measured.png")
    print(table(rows))


if __name__ == "__main__":
    main()

"""`pdserve deploy`: write a cluster's manifests for one target, from one layout.

    pdserve deploy rbg --prefill 2 --decode 1 --tp 2 --model /models/Qwen3-32B --output deploy/rbg
    pdserve deploy kubernetes|compose|eas ...  (eas: --registry redis://HOST:PORT)

Every file starts with the canonical command that makes it (all options spelled out, --output left
out), so a file in the repository can be made again and compared.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pdserve.cli_types import int_at_least
from pdserve.deploy import compose, eas, kubernetes, rbg
from pdserve.deploy.common import Layout, LayoutError, generated_by
from pdserve.options import HelpFormatter
from pdserve.router.policies import POLICIES

TARGETS: dict[str, Callable[[Layout, list[str]], dict[str, str]]] = {
    "kubernetes": kubernetes.generate,
    "rbg": rbg.generate,
    "compose": compose.generate,
    "eas": eas.generate,
}
_positive = int_at_least(1)


def add_deploy_parser(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser(
        "deploy",
        help="write Kubernetes, RoleBasedGroup, docker compose or PAI-EAS manifests for a cluster",
        formatter_class=HelpFormatter,
    )
    d.add_argument("target", choices=sorted(TARGETS), help="what the manifests are for")
    d.add_argument("--name", default="pdserve", help="the cluster's name (objects, services, labels)")
    d.add_argument("--prefill", type=_positive, default=1, metavar="N", help="prefill instances")
    d.add_argument("--decode", type=_positive, default=1, metavar="M", help="decode instances")
    d.add_argument("--tp", type=_positive, default=1, metavar="T", help="tensor parallel ranks per instance")
    d.add_argument(
        "--model", default="/models/model", metavar="PATH", help="the model's path in the container"
    )
    d.add_argument(
        "--model-source",
        default=None,
        help="where the model comes from: kubernetes/rbg, a PVC's name (default: llm-model); compose, a "
        "host directory (default: ./models/BASENAME); eas, an oss:// path",
    )
    d.add_argument("--image", default=None, help="the container image (default: pdserve:cuda or pdserve:cpu)")
    d.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: nvidia.com/gpu = --tp")
    d.add_argument("--port", type=int, default=8000, help="the HTTP port of every container")
    d.add_argument("--kv-port", type=int, default=9000, help="the KV control port (data: the next one)")
    d.add_argument(
        "--registry",
        default=None,
        metavar="URL",
        help="redis://HOST:PORT[/DB]: instances register there and the router reads it (else: DNS)",
    )
    d.add_argument("--policy", choices=POLICIES, default="round_robin", help="the router's policy")
    d.add_argument("--no-api-key", dest="api_key", action="store_false", help="no API key from the Secret")
    d.add_argument("--output", default=None, metavar="DIR", help="write the files here (default: stdout)")
    d.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much the log shows",
    )
    d.set_defaults(func=run_deploy)


def layout_from(args: argparse.Namespace) -> Layout:
    return Layout(
        name=args.name,
        prefill=args.prefill,
        decode=args.decode,
        tp=args.tp,
        model=args.model,
        image=args.image or f"pdserve:{args.device}",
        device=args.device,
        http_port=args.port,
        kv_port=args.kv_port,
        registry=args.registry,
        model_source=args.model_source,
        api_key=args.api_key,
        policy=args.policy,
    )


def canonical_argv(target: str, layout: Layout) -> list[str]:
    """Every option of the layout, spelled out: the command that makes these files again."""
    argv = [target, "--name", layout.name, "--prefill", str(layout.prefill), "--decode", str(layout.decode)]
    argv += ["--tp", str(layout.tp), "--image", layout.image, "--device", layout.device]
    if layout.model is not None:
        argv += ["--model", layout.model]
    argv += ["--port", str(layout.http_port), "--kv-port", str(layout.kv_port), "--policy", layout.policy]
    if layout.model_source is not None:
        argv += ["--model-source", layout.model_source]
    if layout.registry is not None:
        argv += ["--registry", layout.registry]
    if not layout.api_key:
        argv.append("--no-api-key")
    return argv


def generate(target: str, layout: Layout) -> dict[str, str]:
    """{file name: text} for one target."""
    return TARGETS[target](layout, [generated_by(canonical_argv(target, layout))])


def run_deploy(args: argparse.Namespace) -> int:
    try:
        files = generate(args.target, layout_from(args))
    except LayoutError as e:
        logging.getLogger("pdserve").error("%s", e)
        return 2
    if args.output is None:
        sys.stdout.write("".join(files.values()))
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(out / name)
    return 0

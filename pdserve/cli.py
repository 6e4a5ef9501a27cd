"""The `pdserve` command: `serve` one instance and `prepare` the model here; `router`, `up`, `bench`
and `profile`/`simulate`/`plan` come from their own modules, which never import this one.

Every option has a default, so a bare `pdserve serve` serves the default model on 127.0.0.1:8000.
`serve`'s options are declared once, in pdserve/options.py. Heavy imports (torch, transformers, the
server) happen inside the subcommand that needs them.

A prefill or decode instance on a network KV transport does not start without a cluster secret
(--cluster-secret-file, else $PDSERVE_CLUSTER_SECRET): its KV ports would take any peer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pdserve import options
from pdserve.bench.cli import add_bench_parser
from pdserve.cluster_secret import SECRET_ENV, ClusterSecret
from pdserve.config import ServerConfig
from pdserve.deploy.cli import add_deploy_parser
from pdserve.launcher import add_up_parser
from pdserve.planning.cli import add_planning_parsers
from pdserve.router.cli_commands import LOG_LEVELS, add_router_parser

LOG_LEVEL_HELP = "how much the log shows"


def _add_serve(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve one instance over an OpenAI-compatible HTTP API",
        formatter_class=options.HelpFormatter,
    )
    options.add_options(s)
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    s.set_defaults(func=_serve)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "prepare",
        help="locate or convert the model once; print its directory",
        formatter_class=options.HelpFormatter,
    )
    s.add_argument("--model", default=None, help=options.MODEL_HELP)
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    s.set_defaults(func=_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="prefill/decode disaggregated LLM serving",
        formatter_class=options.HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_prepare(sub)
    add_router_parser(sub)
    add_up_parser(sub)
    add_bench_parser(sub)
    add_deploy_parser(sub)
    add_planning_parsers(sub)  # profile, simulate, plan
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The frozen config chain of one instance, from `serve`'s arguments."""
    from pdserve.models.prepare import resolve_model

    given = {o.name: getattr(args, o.name) for o in options.OPTIONS}
    secret = given["cluster_secret"] or ClusterSecret.from_env()  # SecretError: a ValueError
    api_key = args.api_key or os.environ.get(options.API_KEY_ENV) or None  # env: not in `ps`
    return options.server_config(
        **{**given, "model": resolve_model(args.model), "cluster_secret": secret, "api_key": api_key}
    )


def missing_secret(config: ServerConfig) -> str | None:
    """Why this instance must not start without a cluster secret, or None if it may."""
    d = config.engine.disagg
    if d.role == "both" or d.kv_transport == "inproc" or d.cluster_secret is not None:
        return None
    return (
        f"a {d.role} instance on the {d.kv_transport} KV transport needs the cluster's secret, or any "
        f"peer that reaches its KV ports could use them: give --cluster-secret-file FILE or set "
        f"${SECRET_ENV} (pdserve up makes one per cluster)"
    )


def _serve(args: argparse.Namespace) -> int:
    from pdserve.server.openai_api import run_server

    try:
        config = server_config(args)
    except (FileNotFoundError, ValueError) as e:
        logging.getLogger("pdserve").error("%s", e)
        return 2
    refusal = missing_secret(config)
    if refusal is not None:
        logging.getLogger("pdserve").error("%s", refusal)
        return 2
    run_server(config)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pdserve.models.prepare import resolve_model

    try:
        print(resolve_model(args.model))
    except FileNotFoundError as e:
        logging.getLogger("pdserve").error("%s", e)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())

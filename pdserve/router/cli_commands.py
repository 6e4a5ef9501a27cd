"""`pdserve router`: its arguments, and the step from arguments to a running router.

    pdserve router --prefill URL [URL ...] --decode URL [URL ...]     disaggregated
    pdserve router --instance URL [URL ...]                           colocated ("both" instances)
    pdserve router --registry redis://HOST:PORT                       whoever registered there
A URL may be dns://NAME:PORT: every address of the name, re-resolved every few seconds.

The parsers are added to the one `pdserve` command (pdserve/cli.py); `up` shares the routing options.
"""

from __future__ import annotations

import argparse
import logging
import os

from pdserve.cli_types import http_url, int_at_least, parse_size, positive_float
from pdserve.cluster_secret import SECRET_ENV, ClusterSecret
from pdserve.http_edge.limits import DEFAULT_MAX_REQUEST_BYTES
from pdserve.options import HelpFormatter, cluster_secret_file
from pdserve.router.policies import DEFAULT_IMBALANCE, POLICIES

logger = logging.getLogger(__name__)
LOG_LEVELS = ["debug", "info", "warning", "error"]
API_KEY_ENV = "PDSERVE_ROUTER_API_KEY"  # read when --api-key is not given (how `pdserve up` passes it)


_count = int_at_least(0)


def add_routing_options(parser: argparse.ArgumentParser) -> None:
    """The options `router` and `up` share: policy, API key, queue bound, health interval."""
    parser.add_argument(
        "--policy", choices=POLICIES, default="round_robin", help="how the router picks an instance"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require Authorization: Bearer KEY on every route but /health (default: ${API_KEY_ENV}, "
        "else none)",
    )
    parser.add_argument(
        "--decode-max-queued",
        type=_count,
        default=64,
        help="least_loaded skips a decode instance with more queued requests, unless all have more",
    )
    parser.add_argument(
        "--cluster-secret-file",
        dest="cluster_secret",
        type=cluster_secret_file,
        default=None,
        metavar="FILE",
        help=f"the secret the cluster's instances share (signs hand-offs) (default: ${SECRET_ENV})",
    )
    parser.add_argument(
        "--health-interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how often the router checks each instance's /health",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="the longest a request to an instance may take",
    )


def add_resume_options(parser: argparse.ArgumentParser) -> None:
    """How far the router goes to finish a request whose instance fails (router, entry instances)."""
    parser.add_argument(
        "--max-resumes",
        type=_count,
        default=2,
        metavar="N",
        help="retries and resumes of one request on another instance after its instance failed it",
    )
    parser.add_argument(
        "--stall-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="a stream that has sent a token and then nothing for this long is resumed elsewhere",
    )


def add_router_parser(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser(
        "router",
        help="route OpenAI requests to prefill + decode instances (or colocated ones)",
        description="Give --prefill and --decode instances (disaggregated), --instance (colocated), or "
        "--registry.",
        formatter_class=HelpFormatter,
    )
    add_instance_sources(r)
    r.add_argument("--host", default="127.0.0.1", help="the router's HTTP address")
    r.add_argument("--port", type=int, default=8000, help="the router's HTTP port")
    add_routing_options(r)
    r.add_argument(
        "--health-timeout",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="a /health check not answered this fast counts as failed",
    )
    r.add_argument(
        "--cache-imbalance",
        type=positive_float,
        default=DEFAULT_IMBALANCE,
        metavar="FACTOR",
        help="cache_aware keeps a prompt on the instance that served its prefix while that instance's "
        "load is at most FACTOR x (the least loaded's + one request); beyond it, least load",
    )
    add_resume_options(r)
    add_edge_options(r)
    r.set_defaults(func=run_router)


def add_instance_sources(r: argparse.ArgumentParser) -> None:
    """Where the router finds its instances: URL lists, or a registry."""
    r.add_argument(
        "--prefill",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="prefill instances (http://HOST:PORT, or dns://NAME:PORT for every address of a name)",
    )
    r.add_argument("--decode", nargs="+", action="extend", default=[], metavar="URL", help="decode instances")
    r.add_argument(
        "--instance", nargs="+", action="extend", default=[], metavar="URL", help="colocated instances"
    )
    r.add_argument(
        "--registry",
        default=None,
        metavar="URL",
        help="redis://HOST:PORT[/DB]: follow the instances registered there (no URL lists needed)",
    )


def add_edge_options(r: argparse.ArgumentParser) -> None:
    """The router's own HTTP edge, logs, traces and shutdown."""
    r.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="how much the log shows")
    r.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="SIZE",
        help="a larger request body is answered 413 before it is read, e.g. 16MiB",
    )
    r.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    r.add_argument(
        "--otlp-traces-endpoint",
        type=http_url,
        default=None,
        metavar="URL",
        help="send OpenTelemetry spans to this OTLP/HTTP endpoint, e.g. http://collector:4318/v1/traces",
    )
    r.add_argument(
        "--plan-profile",
        default=None,
        metavar="FILE",
        help="a `pdserve profile`: export the prefill/decode counts the observed workload needs",
    )
    r.add_argument(
        "--plan-slo", default="ttft=2000,tpot=100", help="the SLOs of --plan-profile's counts (ms)"
    )
    r.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM: /health and new requests 503, the streams open get this long to finish, exit 0",
    )


def run_router(args: argparse.Namespace) -> None:
    from pdserve.router.app import RouterConfig
    from pdserve.router.app import run_router as serve

    try:
        config = RouterConfig(
            prefill=tuple(args.prefill),
            decode=tuple(args.decode),
            instances=tuple(args.instance),
            host=args.host,
            port=args.port,
            policy=args.policy,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            decode_max_queued=args.decode_max_queued,
            cache_imbalance=args.cache_imbalance,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            request_timeout=args.request_timeout,
            cluster_secret=args.cluster_secret or ClusterSecret.from_env(),
            max_request_bytes=args.max_request_bytes,
            metrics_public=args.metrics_public,
            registry=args.registry,
            otlp_traces_endpoint=args.otlp_traces_endpoint,
            drain_timeout=args.drain_timeout,
            max_resumes=args.max_resumes,
            stall_timeout=args.stall_timeout,
            plan_profile=args.plan_profile,
            plan_slo=args.plan_slo,
        )
    except ValueError as e:
        logger.error("%s", e)
        raise SystemExit(2) from None
    serve(config, args.log_level)

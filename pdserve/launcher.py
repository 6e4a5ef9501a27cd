"""`pdserve up`: N prefill + M decode instances (or K colocated ones) and a router, run as one.

    pdserve up --prefill 1 --decode 2 --num-blocks 512      disaggregated
    pdserve up --instances 2                                  colocated
    pdserve up --instances 2 -- --some-new-serve-flag X       anything after -- goes to each instance
    pdserve up --registry redis://HOST:6379                   instances register there; the router
                                                              follows the registry, not URL lists

Before anything starts, every port it will listen on is checked free (a taken one: exit 1 at once).
The model is prepared once, here, before any instance starts (so they never race on a conversion).
A cluster secret is made in the log directory (mode 0600) unless --cluster-secret-file names one; its
path goes to every child; the API key goes by environment, so neither is in any command line or in
this launcher's output. Each child is `python -m ...` in its own process group, logging to a file under
the printed log directory; each is told by the kernel (PR_SET_PDEATHSIG) to stop if the launcher dies.
The launcher waits until every child is healthy (and is the one listening on its port), prints the
router's URL, then supervises them (supervisor.py: restarts with back-off, gives up after
--max-restarts). On Ctrl-C or SIGTERM it stops them all: SIGTERM (each drains: the requests in flight
finish within --drain-timeout), then SIGKILL what is left after that timeout + STOP_MARGIN_S.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from pdserve.cli_types import int_at_least, positive_float
from pdserve.cluster_secret import ClusterSecret, SecretError
from pdserve.options import (
    API_KEY_ENV,
    BY_NAME,
    MODEL_HELP,
    OPTIONS,
    HelpFormatter,
    Option,
    cluster_secret_file,
    help_with_default,
)
from pdserve.placement import instance_envs, option_value
from pdserve.ports import PortTaken, check_free, free_port
from pdserve.router.cli_commands import API_KEY_ENV as ROUTER_API_KEY_ENV
from pdserve.router.cli_commands import LOG_LEVELS, add_routing_options
from pdserve.supervisor import Child, GiveUp, RestartPolicy, Supervisor, stop_all

# serve options that `up` sets itself for each instance (or, --model, --api-key, the secret: once, for all)
_OWN_SERVE_OPTIONS = {"host", "port", "model", "api_key", "role", "kv_port", "cluster_secret"}
_OWN_SERVE_OPTIONS |= {"prefill_peers", "decode_peers", "decode_max_queued"}  # `up` has a router
SECRET_FILE = "cluster-secret"
STOP_MARGIN_S = 15.0  # after a child's drain: its engine's own stop
_UP_HELP = {"registry": "redis://HOST:PORT[/DB]: the instances register there and the router follows it"}


class LaunchError(Exception):
    """Something failed while starting; the message says what and shows the relevant log."""


class Stop(BaseException):
    """SIGTERM (or SIGINT) arrived: stop everything."""


# ---- the plan: which children, on which ports -------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """What every child of one cluster gets: the model, the secret's file, the API key (or None)."""

    model: str
    secret_file: str
    api_key: str | None


def instance_children(args: argparse.Namespace, shared: Shared, log_dir: Path) -> list[Child]:
    taken: set[int] = {args.port}
    serve_args = [*args.serve_args, *_remainder(args.serve_rest)]
    device = option_value(serve_args, ["--device"], "auto")
    tp = int(option_value(serve_args, ["--tp", "--tensor-parallel-size"], "1"))
    roles = (  # (role, instances, tensor-parallel size of each)
        [("instance", args.instances, tp)]
        if args.instances
        else [
            ("prefill", args.prefill or 1, args.prefill_tp or tp),
            ("decode", args.decode or 1, args.decode_tp or tp),
        ]
    )
    envs = iter(instance_envs([t for _, count, t in roles for _ in range(count)], device, args.gpus))
    env = {API_KEY_ENV: shared.api_key} if shared.api_key else {}  # not on the command line: not in `ps`
    children = []
    for role, count, role_tp in roles:
        for index in range(count):
            port = free_port(taken=taken)
            role_args = (  # KV ports: a free pair, chosen by each
                [] if role == "instance" else ["--role", role, "--tp", str(role_tp)]
            )
            cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--model", shared.model, "--cluster-secret-file", shared.secret_file]
            cmd += [*serve_args, *role_args]  # role_args last: their --tp wins
            name = f"{role}-{index}"
            url = f"http://127.0.0.1:{port}"
            children.append(Child(name, cmd, url, log_dir / f"{name}.log", next(envs), env))
    return children


def router_child(
    args: argparse.Namespace, instances: Sequence[Child], shared: Shared, log_dir: Path
) -> Child:
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", args.host]
    cmd += ["--port", str(args.port), "--policy", args.policy, "--log-level", args.log_level]
    cmd += [
        "--decode-max-queued",
        str(args.decode_max_queued),
        "--health-interval",
        str(args.health_interval),
    ]
    cmd += ["--request-timeout", str(args.request_timeout), "--cluster-secret-file", shared.secret_file]
    serve_args = [*args.serve_args, *_remainder(args.serve_rest)]
    cmd += _router_edge_args(serve_args)
    registry = option_value(serve_args, ["--registry"], "")
    if registry:  # the instances register there: the router follows it, as another router would
        cmd += ["--registry", registry]
    else:
        cmd += _url_lists(instances)
    env = {ROUTER_API_KEY_ENV: shared.api_key} if shared.api_key else {}
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return Child("router", cmd, f"http://{host}:{args.port}", log_dir / "router.log", env=env)


def _url_lists(instances: Sequence[Child]) -> list[str]:
    """--instance / --prefill / --decode with the URLs of the children of each kind."""
    lists = []
    for flag, prefix in (("--instance", "instance-"), ("--prefill", "prefill-"), ("--decode", "decode-")):
        urls = [c.url for c in instances if c.name.startswith(prefix)]
        if urls:
            lists += [flag, *urls]
    return lists


def _router_edge_args(serve_args: Sequence[str]) -> list[str]:
    """The HTTP-edge options the router shares with its instances (body limit, public /metrics, where
    traces go, how long a drain waits)."""
    edge = []
    for flag in ("--max-request-bytes", "--otlp-traces-endpoint", "--drain-timeout"):
        value = option_value(serve_args, [flag], "")
        if value:
            edge += [flag, value]
    if "--metrics-public" in serve_args:
        edge.append("--metrics-public")
    return edge


def _drain_timeout(args: argparse.Namespace) -> float:
    serve_args = [*args.serve_args, *_remainder(args.serve_rest)]
    return float(option_value(serve_args, ["--drain-timeout"], str(BY_NAME["drain_timeout"].default)))


def _remainder(rest: Sequence[str] | None) -> list[str]:
    rest = list(rest or [])
    return rest[1:] if rest[:1] == ["--"] else rest


def secret_file(given: str | None, log_dir: Path) -> str:
    """The cluster secret's file: the one given, else a new one in the log directory (mode 0600)."""
    if given:
        return str(Path(given).resolve())
    path = log_dir / SECRET_FILE
    path.unlink(missing_ok=True)  # O_CREAT's mode applies to a new file only
    ClusterSecret.create_file(path)
    return str(path)


# ---- starting, waiting, watching --------------------------------------------------------------------------


def _is_healthy(client: httpx.Client, child: Child) -> bool:
    """/health answers 200, and from our child: a server we did not start may hold the port."""
    try:
        ok = client.get(f"{child.url}/health").status_code == 200
    except httpx.HTTPError:
        return False
    return ok and child.owns_port()


def wait_healthy(children: Sequence[Child], timeout: float) -> None:
    """Return once every child answers /health 200; raise LaunchError (with its log tail) otherwise."""
    deadline = time.monotonic() + timeout
    pending = list(children)
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while pending:
            for child in list(pending):
                code = child.exit_code()
                if code is not None:
                    raise LaunchError(
                        f"{child.name} exited with code {code}; its log {child.log_path} ends:\n"
                        f"{child.log_tail()}"
                    )
                if _is_healthy(client, child):
                    pending.remove(child)
                    print(f"{child.name} is healthy", flush=True)
            if pending and time.monotonic() > deadline:
                child = pending[0]
                raise LaunchError(
                    f"{child.name} ({child.url}) is not healthy after {timeout:.0f}s; "
                    f"its log {child.log_path} ends:\n{child.log_tail()}"
                )
            time.sleep(0.25)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def plan(args: argparse.Namespace) -> list[Child]:
    """Every child of this cluster (the router last), once their ports are known to be free."""
    from pdserve.models.prepare import resolve_model

    check_free(args.host, args.port, "the router (--port)")  # first: never report another server as ours
    model = resolve_model(args.model)  # once, before any instance can race on a conversion
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or os.environ.get(ROUTER_API_KEY_ENV) or None
    shared = Shared(model, secret_file(args.cluster_secret, log_dir), api_key)
    print(f"model: {model}\nlogs: {log_dir}\ncluster secret: {shared.secret_file}", flush=True)
    instances = instance_children(args, shared, log_dir)
    for child in instances:
        check_free("127.0.0.1", child.port, child.name)
    return [*instances, router_child(args, instances, shared, log_dir)]


def launch(args: argparse.Namespace) -> int:
    children = plan(args)
    policy = RestartPolicy(max_restarts=args.max_restarts, window=args.restart_window)
    try:
        for child in children:
            child.start()
            print(child.describe(), flush=True)
        wait_healthy(children, args.startup_timeout)
        print(f"pdserve is up: {children[-1].url}/v1", flush=True)
        Supervisor(children, policy, args.startup_timeout).run()  # until GiveUp or Stop
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping", flush=True)
        stop_all(children, grace=_drain_timeout(args) + STOP_MARGIN_S)
        print("stopped", flush=True)


def run_up(args: argparse.Namespace) -> int:
    if args.instances and (args.prefill or args.decode):
        print("give either --instances (colocated) or --prefill/--decode", file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        return launch(args)
    except Stop:
        return 0
    except (LaunchError, GiveUp, PortTaken, SecretError, FileNotFoundError) as e:
        print(f"pdserve up failed: {e}", file=sys.stderr, flush=True)
        return 1


# ---- arguments --------------------------------------------------------------------------------------------


class _PassThrough(argparse.Action):
    """Collects a `serve` option, as given, into `serve_args` for every instance."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Any = None,
    ) -> None:
        given = [] if values is None else [values] if not isinstance(values, list) else values
        namespace.serve_args = [*(namespace.serve_args or []), str(option_string), *map(str, given)]


def _checked(parse: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse type that refuses what `parse` refuses here, and passes the text on as it was given."""

    def check(text: str) -> str:
        parse(text)
        return text

    return check


def _add_serve_passthrough(up: argparse.ArgumentParser) -> None:
    """Offer every `pdserve serve` option (but those `up` sets itself), passed through to each instance."""
    group = up.add_argument_group("passed to each instance (see pdserve serve --help)")
    for option in OPTIONS:
        if option.name in _OWN_SERVE_OPTIONS:
            continue
        extra: dict[str, Any] = {"nargs": 0} if option.flag else {"metavar": _metavar(option)}
        if option.type is not None and not option.flag:
            extra["type"] = _checked(option.type)
        group.add_argument(
            *option.flags,
            *option.off_flags,
            action=_PassThrough,
            dest="serve_args",
            default=[],  # nothing given: the instance's own default, which the help shows
            help=_UP_HELP.get(option.name) or help_with_default(option),
            choices=list(option.choices) if option.choices else None,
            **extra,
        )


def _metavar(option: Option) -> str:
    return option.metavar or option.flags[-1].lstrip("-").upper().replace("-", "_")


def _adapt_routing_options(up: argparse.ArgumentParser) -> None:
    """`up` hands the secret's file on to its children: --cluster-secret-file (a routing option, parsed
    into the secret for the router) keeps its path here, once checked readable and long enough."""
    for action in up._actions:
        if action.dest == "cluster_secret":
            action.type = _checked(cluster_secret_file)
            action.help = "the secret the cluster shares (default: a new one, mode 0600, in --log-dir)"
        elif action.dest == "api_key":
            action.help = (
                f"require Authorization: Bearer KEY on the router and every instance, on every route but "
                f"/health (default: ${API_KEY_ENV} or ${ROUTER_API_KEY_ENV}, else none)"
            )


_count = int_at_least(1)


def _add_supervision_options(up: argparse.ArgumentParser) -> None:
    up.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="how long each child may take to become healthy, at start and after a restart",
    )
    up.add_argument(
        "--max-restarts",
        type=int_at_least(0),
        default=5,
        metavar="N",
        help="a child that exits or whose engine died is restarted (back-off 1, 2, 4 ... s); one more "
        "failure after N restarts within --restart-window stops everything (exit 1)",
    )
    up.add_argument(
        "--restart-window",
        type=positive_float,
        default=300.0,
        metavar="SECONDS",
        help="the window in which --max-restarts counts",
    )


def add_up_parser(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up",
        help="start prefill + decode instances (or colocated ones) and a router",
        description="Start instances and a router, restart any that fails; stop them all on Ctrl-C or "
        "SIGTERM.",
        formatter_class=HelpFormatter,
    )
    up.add_argument(
        "--prefill", type=_count, default=None, metavar="N", help="prefill instances (default: 1)"
    )
    up.add_argument("--decode", type=_count, default=None, metavar="M", help="decode instances (default: 1)")
    up.add_argument(
        "--instances",
        type=_count,
        default=None,
        metavar="K",
        help="colocated instances instead (default: none)",
    )
    up.add_argument(
        "--prefill-tp",
        type=_count,
        default=None,
        metavar="N",
        help="each prefill instance's --tp (default: --tp)",
    )
    up.add_argument(
        "--decode-tp",
        type=_count,
        default=None,
        metavar="N",
        help="each decode instance's --tp (default: --tp)",
    )
    up.add_argument("--model", default=None, help=MODEL_HELP)
    up.add_argument(
        "--gpus",
        default=None,
        help="GPU ids to spread instances over, e.g. 0,1 (default: every visible GPU; tp GPUs each)",
    )
    up.add_argument("--host", default="127.0.0.1", help="the router's host (instances listen on 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="the router's port")
    add_routing_options(up)
    _adapt_routing_options(up)
    up.add_argument("--log-dir", default=None, help="where the children's logs go (default: a new temp dir)")
    _add_supervision_options(up)
    up.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the router's log level")
    up.add_argument("serve_rest", nargs=argparse.REMAINDER, help="after --: more arguments for each instance")
    up.set_defaults(func=run_up, serve_args=[])
    _add_serve_passthrough(up)

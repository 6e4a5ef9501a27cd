"""`pdserve up`: N prefill + M decode instances (or K colocated ones) and a router, run as one.

    pdserve up --prefill 1 --decode 2 --num-blocks 512      disaggregated
    pdserve up --instances 2                                  colocated
    pdserve up --instances 2 -- --some-new-serve-flag X       anything after -- goes to each instance

The model is prepared once, here, before any instance starts (so they never race on a conversion).
Each child is `python -m ...` in its own process group, logging to a file under the printed log
directory; each is told by the kernel (PR_SET_PDEATHSIG) to stop if the launcher dies. The launcher
waits until every child is healthy (or shows the failing one's log tail), prints the router's URL, and
on Ctrl-C or SIGTERM stops them all: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from pdserve.cli_types import int_at_least
from pdserve.options import MODEL_HELP, OPTIONS, Option
from pdserve.placement import instance_envs, option_value
from pdserve.router.cli_commands import API_KEY_ENV, LOG_LEVELS, add_routing_options

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0
# serve options that `up` sets itself for each instance (or, --model, --api-key, the secret: once, for all)
_OWN_SERVE_OPTIONS = {"host", "port", "model", "api_key", "role", "kv_port", "cluster_secret"}


class LaunchError(Exception):
    """Something failed while starting; the message says what and shows the relevant log."""


class Stop(BaseException):
    """SIGTERM (or SIGINT) arrived: stop everything."""


# ---- children ---------------------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class Child:
    """One process the launcher owns: its command, its URL and its log."""

    name: str
    cmd: list[str]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: we stop it and whatever it starts
            preexec_fn=_die_with_parent(),
        )

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_all(children: Sequence[Child], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every child's group, wait up to `grace`, then SIGKILL what is left (and reap it all)."""
    for child in children:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{child.name} did not stop in {grace:.0f}s: SIGKILL", file=sys.stderr, flush=True)
        child.signal_group(signal.SIGKILL)  # also whatever it left behind in its group
        child.process.wait()
        child.close_log()


# ---- the plan: which children, on which ports -------------------------------------------------------------


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port nobody listens on now (and not in `taken`)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def instance_children(args: argparse.Namespace, model: str, log_dir: Path) -> list[Child]:
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
    children = []
    for role, count, role_tp in roles:
        for index in range(count):
            port = free_port(taken=taken)
            role_args = (  # KV ports: a free pair, chosen by each
                [] if role == "instance" else ["--role", role, "--tp", str(role_tp)]
            )
            cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--model", model, *serve_args, *role_args]  # role_args last: their --tp wins
            name = f"{role}-{index}"
            env = next(envs)
            children.append(Child(name, cmd, f"http://127.0.0.1:{port}", log_dir / f"{name}.log", env))
    return children


def router_child(args: argparse.Namespace, instances: Sequence[Child], log_dir: Path) -> Child:
    cmd = [sys.executable, "-m", "pdserve.cli", "router", "--host", args.host]
    cmd += ["--port", str(args.port), "--policy", args.policy, "--log-level", args.log_level]
    cmd += [
        "--decode-max-queued",
        str(args.decode_max_queued),
        "--health-interval",
        str(args.health_interval),
    ]
    cmd += ["--request-timeout", str(args.request_timeout)]
    for flag, prefix in (("--instance", "instance-"), ("--prefill", "prefill-"), ("--decode", "decode-")):
        urls = [c.url for c in instances if c.name.startswith(prefix)]
        if urls:
            cmd += [flag, *urls]
    env = {API_KEY_ENV: args.api_key} if args.api_key else {}  # not on the command line, so not in `ps`
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return Child("router", cmd, f"http://{host}:{args.port}", log_dir / "router.log", env)


def _remainder(rest: Sequence[str] | None) -> list[str]:
    rest = list(rest or [])
    return rest[1:] if rest[:1] == ["--"] else rest


# ---- starting, waiting, watching --------------------------------------------------------------------------


def _is_healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


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
                if _is_healthy(client, child.url):
                    pending.remove(child)
                    print(f"{child.name} is healthy", flush=True)
            if pending and time.monotonic() > deadline:
                child = pending[0]
                raise LaunchError(
                    f"{child.name} ({child.url}) is not healthy after {timeout:.0f}s; "
                    f"its log {child.log_path} ends:\n{child.log_tail()}"
                )
            time.sleep(0.25)


def watch(children: Sequence[Child], router: Child) -> int:
    """Until a signal: report children that exit; if the router exits, so does the launcher."""
    reported: set[str] = set()
    while True:
        for child in children:
            code = child.exit_code()
            if code is None or child.name in reported:
                continue
            reported.add(child.name)
            print(
                f"{child.name} exited with code {code}; its log ends:\n{child.log_tail()}",
                file=sys.stderr,
                flush=True,
            )
            if child is router:
                return 1
        time.sleep(0.5)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def launch(args: argparse.Namespace) -> int:
    from pdserve.models.prepare import resolve_model

    model = resolve_model(args.model)  # once, before any instance can race on a conversion
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"model: {model}\nlogs: {log_dir}", flush=True)
    instances = instance_children(args, model, log_dir)
    router = router_child(args, instances, log_dir)
    children = [*instances, router]
    try:
        for child in children:
            child.start()
            placed = " ".join(f"{k}={v}" for k, v in child.env.items())
            print(f"{child.name}: pid {child.pid} at {child.url}, log {child.log_path} {placed}", flush=True)
        wait_healthy(children, args.startup_timeout)
        print(f"pdserve is up: {router.url}/v1", flush=True)
        return watch(children, router)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping", flush=True)
        stop_all(children)
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
    except (LaunchError, FileNotFoundError) as e:
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
            action=_PassThrough,
            dest="serve_args",
            default=[],
            help=option.help,
            choices=list(option.choices) if option.choices else None,
            **extra,
        )


def _metavar(option: Option) -> str:
    return option.metavar or option.flags[-1].lstrip("-").upper().replace("-", "_")


_count = int_at_least(1)


def add_up_parser(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up",
        help="start prefill + decode instances (or colocated ones) and a router",
        description="Start instances and a router; stop them all on Ctrl-C or SIGTERM.",
    )
    up.add_argument("--prefill", type=_count, default=None, metavar="N", help="prefill instances (default 1)")
    up.add_argument("--decode", type=_count, default=None, metavar="M", help="decode instances (default 1)")
    up.add_argument("--instances", type=_count, default=None, metavar="K", help="colocated instances instead")
    up.add_argument(
        "--prefill-tp", type=_count, default=None, metavar="N", help="each prefill instance's --tp"
    )
    up.add_argument("--decode-tp", type=_count, default=None, metavar="N", help="each decode instance's --tp")
    up.add_argument("--model", default=None, help=MODEL_HELP)
    up.add_argument(
        "--gpus",
        default=None,
        help="GPU ids to spread instances over, e.g. 0,1 (default: every visible GPU; tp GPUs each)",
    )
    up.add_argument("--host", default="127.0.0.1", help="the router's host")
    up.add_argument("--port", type=int, default=8000, help="the router's port")
    add_routing_options(up)
    up.add_argument("--log-dir", default=None, help="where the children's logs go (default: a new temp dir)")
    up.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS")
    up.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the router's log level")
    up.add_argument("serve_rest", nargs=argparse.REMAINDER, help="after --: more arguments for each instance")
    up.set_defaults(func=run_up, serve_args=[])
    _add_serve_passthrough(up)

"""Keeping `pdserve up`'s children running: each child is a process in its own group, logging to a
file; one that exits, or whose /health answers 503 `engine_dead`, is stopped and started again on the
same port after a back-off (1, 2, 4 ... s). More than `max_restarts` restarts within `window` seconds
and the supervisor gives up (GiveUp, with that child's log tail); the launcher then stops everything.

A child that does not answer /health (stopped, or busy) is left alone: only an exit or an engine that
says it is dead is a failure. This module knows nothing of roles, ports or commands (launcher.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

import httpx

from pdserve.ports import listens_on

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0
ENGINE_DEAD = "engine_dead"  # the error code of an instance's /health when its engine has stopped


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
    """One process the launcher owns: its command, its URL and its log. `placement` (GPUs, threads)
    is shown in the launcher's output; `env` is not (it may hold the API key)."""

    name: str
    cmd: list[str]
    url: str
    log_path: Path
    placement: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self.close_log()
        self._log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.placement, **self.env}
        self.process = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: we stop it and whatever it starts
            preexec_fn=_die_with_parent(),
        )

    def describe(self) -> str:
        placed = " ".join(f"{k}={v}" for k, v in self.placement.items())
        return f"{self.name}: pid {self.pid} at {self.url}, log {self.log_path} {placed}".rstrip()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def owns_port(self) -> bool:
        """Is it this child that listens on its port (not a server that took the port meanwhile)?"""
        return listens_on(self.pid, self.port)

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


def probe(client: httpx.Client, url: str) -> str:
    """'ok' (200), 'engine_dead' (503 with that code), or 'down' (anything else, or no answer)."""
    try:
        answer = client.get(f"{url}/health")
    except httpx.HTTPError:
        return "down"
    if answer.status_code == 200:
        return "ok"
    if answer.status_code == 503:
        with contextlib.suppress(ValueError, AttributeError):
            if answer.json()["error"]["code"] == ENGINE_DEAD:
                return ENGINE_DEAD
    return "down"


class GiveUp(Exception):
    """A child failed more often than the restart policy allows; the message has its log tail."""


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # within `window` seconds; 0: the first failure gives up
    window: float = 300.0
    first_backoff: float = 1.0  # then doubling, up to max_backoff
    max_backoff: float = 30.0

    def backoff(self, recent: int) -> float:
        return float(min(self.max_backoff, self.first_backoff * 2**recent))


@dataclass
class _Watched:
    """A child's supervision state: when it last failed, and what is pending."""

    child: Child
    restarts: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # failed: start again at this time
    starting_since: float | None = None  # restarted: not yet healthy


class Supervisor:
    """Watches children until a signal interrupts `run` or one fails too often (GiveUp)."""

    def __init__(
        self,
        children: Sequence[Child],
        policy: RestartPolicy,
        startup_timeout: float,
        health_interval: float = 2.0,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.watched = [_Watched(c) for c in children]
        self.policy = policy
        self.startup_timeout = startup_timeout
        self.health_interval = health_interval
        self.say = say

    def run(self, tick: float = 0.25) -> NoReturn:
        next_probe = 0.0
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                now = time.monotonic()
                probe_now = now >= next_probe
                if probe_now:
                    next_probe = now + self.health_interval
                for w in self.watched:
                    self._check(w, client if probe_now else None, now)
                time.sleep(tick)

    def _check(self, w: _Watched, client: httpx.Client | None, now: float) -> None:
        if w.restart_at is not None:
            if now >= w.restart_at:
                self._start_again(w, now)
            return
        code = w.child.exit_code()
        if code is not None:
            self._failed(w, f"exited with code {code}", now)
            return
        if client is None:
            return
        state = probe(client, w.child.url)
        if state == ENGINE_DEAD:
            self._failed(w, "reports engine_dead", now)
        elif state == "ok" and w.starting_since is not None and w.child.owns_port():
            w.starting_since = None
            self.say(f"{w.child.name} is healthy again")
        elif w.starting_since is not None and now - w.starting_since > self.startup_timeout:
            self._failed(w, f"is not healthy {self.startup_timeout:.0f}s after its restart", now)

    def _failed(self, w: _Watched, why: str, now: float) -> None:
        """Stop what is left of it; schedule its restart, or give up."""
        stop_all([w.child], grace=5.0)
        while w.restarts and now - w.restarts[0] > self.policy.window:
            w.restarts.popleft()
        recent = len(w.restarts)
        if recent >= self.policy.max_restarts:
            raise GiveUp(
                f"{w.child.name} {why}; it was restarted {recent} times in {self.policy.window:.0f}s, "
                f"giving up. Its log {w.child.log_path} ends:\n{w.child.log_tail()}"
            )
        delay = self.policy.backoff(recent)
        w.restarts.append(now)
        w.restart_at, w.starting_since = now + delay, None
        self.say(
            f"{w.child.name} {why}; restarting it in {delay:g}s "
            f"(restart {recent + 1} of at most {self.policy.max_restarts} in {self.policy.window:.0f}s). "
            f"Its log ends:\n{w.child.log_tail(10)}"
        )

    def _start_again(self, w: _Watched, now: float) -> None:
        w.restart_at, w.starting_since = None, now
        w.child.start()
        self.say(w.child.describe())

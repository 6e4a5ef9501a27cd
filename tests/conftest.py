"""Shared fixtures: the default model, its tokenizer, and real `pdserve serve` processes for e2e tests.

Servers are started lazily (only tests that ask for them pay), once per session, each in its own
process group on a free port, and killed with their children at teardown even when tests fail. After
every test that used a server, the KV pool of that server must return to fully free.

The hooks here run the suite on pytest-xdist workers (tests/parallel.py: units of work, heaviest
first, one torch thread each) and end module fixtures after their last test (tests/lifetimes.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdserve.models.prepare import resolve_model
from tests.lifetimes import plan_releases, release_unneeded
from tests.parallel import distributed, make_scheduler, one_thread_per_worker, plan
from tests.ports import free_port

API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 240.0  # a cold start on two contended CPU cores
POOL_FREE_TIMEOUT_S = 60.0
SERVER_FIXTURES = ("server", "small_server")
TUNED = {"temperature": 0.0, "repetition_penalty": 1.3, "do_sample": True}  # small_server's model


def pytest_configure(config: pytest.Config) -> None:
    one_thread_per_worker()
    if distributed(config) and not hasattr(config, "workerinput"):
        resolve_model(None)  # prepared once here, before the workers start: two would race to write it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if distributed(config):
        plan(items)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return make_scheduler(config, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    plan_releases(session.items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        release_unneeded(item)


class ServerProcess:
    """One `pdserve serve` subprocess, its port and its log."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_path
        cmd = [sys.executable, "-m", "pdserve.cli", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def kv(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/debug/kv", headers=self.headers, timeout=30).json())

    def wait_pool_free(self, timeout: float = POOL_FREE_TIMEOUT_S) -> dict[str, Any]:
        """Poll until no request holds a KV block (aborts land on the engine's next step)."""
        deadline = time.monotonic() + timeout
        kv = self.kv()
        while not kv["pool_free"] and time.monotonic() < deadline:
            time.sleep(0.2)
            kv = self.kv()
        return kv

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the process group, SIGKILL it if it lingers; returns the server's exit code."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
                    return -signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # stray children, if any
            return int(self.proc.returncode)
        finally:
            self._log.close()


@contextlib.contextmanager
def running_server(log_path: Path, args: list[str], api_key: str | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path, api_key)
    try:
        server.wait_ready()
        yield server
    finally:
        rc = server.stop()
    assert rc == 0, f"server did not shut down cleanly on SIGTERM (rc={rc}):\n{server.log()}"


@pytest.fixture(scope="session")
def model_dir() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def server(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main test server: a small KV pool, an API key on /v1/*, the answer parsers on (inert unless
    an answer opens with <think> or a request has tools: tests/e2e/test_api_surface.py)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", model_dir, "--num-blocks", "512", "--max-num-seqs", "16", "--device", "cpu"]
    args += ["--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with running_server(log, args, api_key=API_KEY) as s:
        yield s


def tuned_model(model_dir: str, root: Path) -> Path:
    """A copy of the default model (links to its files) whose generation_config.json adds TUNED."""
    tuned = root / "model"
    tuned.mkdir()
    for name in os.listdir(model_dir):
        if name != "generation_config.json":
            (tuned / name).symlink_to(Path(model_dir) / name)
    config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    (tuned / "generation_config.json").write_text(json.dumps({**config, **TUNED}))
    return tuned


@pytest.fixture(scope="session")
def small_server(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A 128-block KV pool, one running request and one waiting at most (the rest must get 503 at
    once), serving a copy of the default model whose generation_config.json asks for TUNED sampling.
    The overload, pool-size and sampling-defaults tests need none of what the others change, so they
    share this one start."""
    root = tmp_path_factory.mktemp("small")
    args = ["--model", str(tuned_model(model_dir, root)), "--served-model-name", MODEL, "--num-blocks", "128"]
    args += ["--max-num-seqs", "1", "--max-waiting", "1", "--device", "cpu"]
    with running_server(root / "server.log", args) as s:
        yield s


@pytest.fixture(autouse=True)
def kv_pool_returns_free(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used a server: every KV block is free again."""
    yield
    for name in SERVER_FIXTURES:
        if name in request.fixturenames:
            server: ServerProcess = request.getfixturevalue(name)
            if server.proc.poll() is None:
                kv = server.wait_pool_free()
                assert kv["pool_free"], f"KV blocks still held after {request.node.name}: {kv}"

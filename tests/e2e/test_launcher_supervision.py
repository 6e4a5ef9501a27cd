"""`pdserve up` as a supervisor: it refuses a taken port before starting anything (even when the
server on it answers /health), restarts a child that dies, gives up after --max-restarts, restarts an
instance whose /health says engine_dead, and keeps its secrets out of its output and of every argv.

The 1P1D cluster is real (`pdserve up`, the default model). The supervisor's own checks run on small
stand-in children (a Python one-liner that exits, a tiny HTTP server that answers like an instance
whose engine died), so that restarts, back-off and giving up cost seconds, not model loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pdserve.supervisor import Child, GiveUp, RestartPolicy, Supervisor, stop_all
from tests.e2e.cluster import MODEL, ROOT, SERVER_ENV, free_port, pdserve_up, wait_until

API_KEY = "launcher-test-key-7f3a"


class _Healthy(BaseHTTPRequestHandler):
    """Another server: 200 to everything (the launcher once took its answer for its own router's)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def other_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_up_on_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    with other_server() as port:
        cmd = [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--log-dir", str(tmp_path)]
        cmd += ["--device", "cpu", "--num-blocks", "16"]
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and, on a failure, what it started
            proc.wait(10)
        seconds = time.monotonic() - started
    assert proc.returncode != 0, output
    assert "is up" not in output and "healthy" not in output, output
    assert f"port {port}" in output and "taken" in output, output
    assert seconds < 15, f"{seconds:.1f}s:\n{output}"
    assert not list(tmp_path.glob("*.log")), "a child was started"


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


def _complete(v1: str, headers: dict[str, str]) -> int:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4}
    return httpx.post(f"{v1}/completions", json=body, headers=headers, timeout=120).status_code


def test_up_restarts_a_killed_decode_and_keeps_its_secrets(tmp_path: Path) -> None:
    args = ["--prefill", "1", "--decode", "1", "--num-blocks", "64", "--max-num-seqs", "4", "--device", "cpu"]
    args += ["--health-interval", "0.5", "--api-key", API_KEY]
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with pdserve_up(tmp_path, *args) as up:
        assert _complete(up.router_v1, auth) == 200, up.output()
        # the key reached the instances (by environment), and is in no argv and not in the output
        decode = up.url("decode-0")
        assert httpx.get(f"{decode}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{decode}/v1/models", headers=auth, timeout=10).status_code == 200
        assert API_KEY not in up.output()
        secret = tmp_path / "cluster-secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        text = secret.read_text().strip()
        for name in ("prefill-0", "decode-0", "router"):
            argv = _cmdline(up.pid(name))
            assert f"--cluster-secret-file {secret}" in argv, argv
            assert API_KEY not in argv and text not in argv, argv
        assert text not in up.output()

        old = up.pid("decode-0")
        os.killpg(old, signal.SIGKILL)
        killed = time.monotonic()
        restarted = wait_until(lambda: "decode-0 is healthy again" in up.output(), 180, 0.5)
        assert restarted, up.output()
        assert up.pid("decode-0") != old and "decode-0 exited with code -9; restarting" in up.output()
        assert wait_until(lambda: _complete(up.router_v1, auth) == 200, 60, 0.5), up.output()
        print(f"decode SIGKILLed: restarted, and the router answered {time.monotonic() - killed:.1f}s later")


# ---- the supervisor, on stand-in children ----------------------------------------------------------------

_ENGINE_DEAD_ONCE = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
runs = Path(sys.argv[2])
first = not runs.exists()
runs.write_text("started")
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        dead = {"error": {"message": "stopped", "type": "service_unavailable_error", "code": "engine_dead"}}
        body = json.dumps(dead if first else {"status": "ok"}).encode()
        self.send_response(503 if first else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class _Done(Exception):
    pass


def test_supervisor_restarts_an_instance_whose_engine_died(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", _ENGINE_DEAD_ONCE, str(port), str(tmp_path / "runs")]
    child = Child("decode-0", cmd, f"http://127.0.0.1:{port}", tmp_path / "decode-0.log", env=SERVER_ENV)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if "is healthy again" in line:
            raise _Done

    child.start()
    first = child.pid
    try:
        policy = RestartPolicy(max_restarts=3, first_backoff=0.1)
        with pytest.raises(_Done):
            Supervisor([child], policy, startup_timeout=30, health_interval=0.2, say=say).run(tick=0.05)
        assert child.pid != first and child.exit_code() is None
    finally:
        stop_all([child], grace=2)
    assert said[0].startswith("decode-0 reports engine_dead; restarting it in 0.1s (restart 1 of"), said


def test_supervisor_gives_up_after_max_restarts_with_the_log_tail(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('cannot start: no model here'); sys.exit(3)"]
    child = Child("prefill-0", cmd, f"http://127.0.0.1:{free_port()}", tmp_path / "prefill-0.log")
    said: list[str] = []
    child.start()
    started = time.monotonic()
    try:
        policy = RestartPolicy(max_restarts=2, first_backoff=0.1)
        with pytest.raises(GiveUp) as failure:
            Supervisor([child], policy, startup_timeout=30, say=said.append).run(tick=0.05)
    finally:
        stop_all([child], grace=2)
    message = str(failure.value)
    assert "prefill-0 exited with code 3" in message and "giving up" in message, message
    assert "cannot start: no model here" in message, message
    restarts = [line for line in said if "restarting it in" in line]
    assert [line.split("(")[1].split(" of")[0] for line in restarts] == ["restart 1", "restart 2"], said
    assert time.monotonic() - started < 10

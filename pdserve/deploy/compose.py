"""docker compose, for one host: one service per instance (prefill-0 ..., decode-0 ...) and the router.

    router     pdserve router --prefill http://prefill-0:PORT ... --decode http://decode-0:PORT ...
    prefill-i  pdserve serve --role prefill --kv-advertise-host prefill-i   (its own GPUs: i*T .. i*T+T-1)
    decode-j   pdserve serve --role decode  --kv-advertise-host decode-j

Each instance is a service of its own so that it has a name its peers resolve and GPUs of its own, as
`pdserve up --gpus` gives them. The cluster secret and the API key are compose secrets (files beside
compose.yaml, never in it); a two-line shell entrypoint reads the key file into the variable the
command reads, and hands over to the command line unchanged. `$$` is compose's escape for `$`.
"""

from __future__ import annotations

import posixpath

from pdserve.deploy.common import (
    API_KEY_KEY,
    INSTANCE_ROLES,
    SECRET_KEY_FILE,
    Layout,
    api_key_env,
    router_argv,
    secret_path,
    serve_argv,
)
from pdserve.deploy.pods import GRACE_S, Obj
from pdserve.deploy.render import yaml_documents

API_KEY_FILE = f"/run/secrets/{API_KEY_KEY}"


def entrypoint(layout: Layout, command: str) -> list[str] | None:
    """`sh -c SCRIPT sh` before the command line: the API key from its file into the environment."""
    if not layout.api_key:
        return None
    script = f'export {api_key_env(command)}="$$(cat {API_KEY_FILE})"; exec "$$@"'
    return ["sh", "-c", script, "sh"]


def _secrets(layout: Layout) -> list[Obj]:
    secrets: list[Obj] = [{"source": SECRET_KEY_FILE, "target": secret_path()}]
    if layout.api_key:
        secrets.append({"source": API_KEY_KEY, "target": API_KEY_FILE})
    return secrets


def _healthcheck(layout: Layout) -> Obj:
    probe = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{layout.http_port}/health', timeout=5)"
    return {
        "test": ["CMD", "python", "-c", probe],
        "interval": "10s",
        "timeout": "6s",
        "retries": 3,
        "start_period": "600s",
    }


def _service(layout: Layout, command: str, argv: list[str]) -> Obj:
    svc: Obj = {"image": layout.image}
    entry = entrypoint(layout, command)
    if entry is not None:
        svc["entrypoint"] = entry
    svc.update({"command": argv, "secrets": _secrets(layout), "healthcheck": _healthcheck(layout)})
    svc["stop_grace_period"] = f"{GRACE_S}s"
    return svc


def _gpus(layout: Layout, first: int) -> Obj:
    ids = [str(g) for g in range(first, first + layout.gpus)]
    device = {"driver": "nvidia", "device_ids": ids, "capabilities": ["gpu"]}
    return {"resources": {"reservations": {"devices": [device]}}}


def instance(layout: Layout, role: str, index: int, first_gpu: int) -> Obj:
    host = f"{role}-{index}"
    svc = _service(layout, "serve", serve_argv(layout, role, host))
    svc["shm_size"] = "16gb"  # NCCL and the CPU TP ranks share tensors through /dev/shm
    mount = layout.model_mount
    if mount is not None:
        source = layout.model_source or f"./models/{posixpath.basename(mount.rstrip('/'))}"
        svc["volumes"] = [f"{source}:{mount}:ro"]
    if layout.gpus:
        svc["deploy"] = _gpus(layout, first_gpu)
    return svc


def services(layout: Layout) -> Obj:
    out: Obj = {}
    urls: dict[str, list[str]] = {}
    gpu = 0
    for role in INSTANCE_ROLES:
        urls[role] = []
        for i in range(layout.count(role)):
            out[f"{role}-{i}"] = instance(layout, role, i, gpu)
            urls[role].append(f"http://{role}-{i}:{layout.http_port}")
            gpu += layout.gpus
    router = _service(layout, "router", router_argv(layout, urls["prefill"], urls["decode"]))
    router["ports"] = [f"{layout.http_port}:{layout.http_port}"]
    return {"router": router, **out}


def generate(layout: Layout, header: list[str]) -> dict[str, str]:
    """{file name: text}: compose.yaml."""
    secrets: Obj = {SECRET_KEY_FILE: {"file": f"./secrets/{SECRET_KEY_FILE}"}}
    if layout.api_key:
        secrets[API_KEY_KEY] = {"file": f"./secrets/{API_KEY_KEY}"}
    doc = {"name": layout.name, "services": services(layout), "secrets": secrets}
    howto = [
        "Create the secrets beside this file first (never in it):",
        f"  mkdir -p secrets && head -c 32 /dev/urandom | base64 > secrets/{SECRET_KEY_FILE}",
    ]
    if layout.api_key:
        howto.append(f"  printf %s YOUR-API-KEY > secrets/{API_KEY_KEY}")
    howto.append("then: docker compose up -d; clients call http://localhost:" + str(layout.http_port))
    return {"compose.yaml": yaml_documents([*header, *howto], [doc])}

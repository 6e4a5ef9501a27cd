"""PAI-EAS: the BladeLLM seed's service group, with pdserve instances.

Two EAS services in one group (`metadata.group`), as BladeLLM's prefill and decode services are:

    NAME_prefill  N x pdserve serve --role prefill --registry redis://...   (clients call this one)
    NAME_decode   M x pdserve serve --role decode  --registry redis://...

EAS has no per-instance DNS, so instances find each other through the registry (BladeLLM's naming
service): a prefill instance that knows its decode peers is an entry, picks a decode instance by load
and relays its stream, as BladeLLM's prefill service does. The file is a JSON list of the services'
JSON (one `eascmd create` each). The model and the Secret's files (cluster-secret, api-key) are OSS
mounts; the key is read from its file by the service's script, so no value is in the JSON.
"""

from __future__ import annotations

import posixpath
import shlex

from pdserve.deploy.common import (
    API_KEY_KEY,
    INSTANCE_ROLES,
    SECRET_DIR,
    Layout,
    LayoutError,
    api_key_env,
    serve_argv,
)
from pdserve.deploy.pods import Obj
from pdserve.deploy.render import json_document

ADVERTISE = "$(hostname -i)"  # the instance's own address, as its peers reach it
DEFAULT_BUCKET = "oss://YOUR-BUCKET"


def script(layout: Layout, role: str) -> str:
    """The service's shell command: the API key from its file, then the instance's command line."""
    argv = serve_argv(layout, role, ADVERTISE)
    words = [f'"{w}"' if w == ADVERTISE else shlex.quote(w) for w in argv]
    run = "exec " + " ".join(words)
    if not layout.api_key:
        return run
    return f'export {api_key_env("serve")}="$(cat {SECRET_DIR}/{API_KEY_KEY})"; {run}'


def _storage(layout: Layout) -> list[Obj]:
    storage: list[Obj] = []
    mount = layout.model_mount
    if mount is not None:
        base = posixpath.basename(mount.rstrip("/"))
        source = layout.model_source or f"{DEFAULT_BUCKET}/models/{base}/"
        storage.append({"mount_path": mount, "oss": {"path": source, "readOnly": True}})
    secret = {"path": f"{DEFAULT_BUCKET}/{layout.name}/secret/", "readOnly": True}
    storage.append({"mount_path": SECRET_DIR, "oss": secret})
    return storage


def service(layout: Layout, role: str) -> Obj:
    metadata: Obj = {
        "name": f"{layout.name}_{role}".replace("-", "_"),
        "group": layout.name.replace("-", "_"),
        "instance": layout.count(role),
    }
    if layout.gpus:
        metadata["gpu"] = layout.gpus
    container = {"image": layout.image, "script": script(layout, role), "port": layout.http_port}
    return {"metadata": metadata, "containers": [container], "storage": _storage(layout)}


def generate(layout: Layout, header: list[str]) -> dict[str, str]:
    """{file name: text}: the services of the group, as one JSON list."""
    del header  # JSON has no comments: deploy/README.md gives the command
    if layout.registry is None:
        raise LayoutError("eas: give --registry redis://HOST:PORT[/DB] (EAS has no per-instance DNS)")
    return {f"{layout.name}.json": json_document([service(layout, r) for r in INSTANCE_ROLES])}

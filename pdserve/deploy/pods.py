"""The pod templates that plain Kubernetes (kubernetes.py) and RoleBasedGroup (rbg.py) both run.

One instance pod:
- `pdserve serve --role R --tp T ... --kv-advertise-host $(POD_IP)`: the pod IP from the downward API,
  so every replica of a StatefulSet advertises its own address to its peers;
- the cluster secret as a file from the Secret, the API key from the same Secret through the
  environment (never in the manifest, never on the command line);
- nvidia.com/gpu = T (on CUDA), /dev/shm in memory (NCCL and the CPU TP ranks use it);
- a startup probe on /health (loading a large model takes minutes), then readiness and liveness on it;
- a preStop sleep: the pod leaves the headless Service at once, and the router's DNS re-resolution
  sees it gone while it still serves; then SIGTERM, and the process drains (server/drain.py,
  router/drain.py): /health 503, out of the registry, new requests 503, those in flight finish within
  --drain-timeout; terminationGracePeriodSeconds covers the sleep, the drain and the engine's stop;
- Prometheus scrape annotations on /metrics, which --metrics-public serves without the key.
The router pod is the same, except its startup and liveness probes are TCP checks: its /health
answers 503 while no instance is healthy, which must take it out of the Service, not restart it.
"""

from __future__ import annotations

from typing import Any

from pdserve.deploy.common import (
    API_KEY_KEY,
    SECRET_DIR,
    SECRET_KEY_FILE,
    Layout,
    api_key_env,
)
from pdserve.http_edge.uvicorn_setup import GRACEFUL_SHUTDOWN_S
from pdserve.options import BY_NAME

USER_ID = 1000  # the images' user (deploy/Dockerfile.*): the Secret's files are readable by its group
PRESTOP_S = 15  # preStop: longer than the endpoints update plus the router's DNS re-resolution
DRAIN_TIMEOUT_S = int(BY_NAME["drain_timeout"].default)  # then SIGTERM: the drain (serve and router)
GRACE_S = PRESTOP_S + DRAIN_TIMEOUT_S + GRACEFUL_SHUTDOWN_S + 15  # and uvicorn's, the engine's own stop
Obj = dict[str, Any]


def labels(layout: Layout, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pdserve",
        "app.kubernetes.io/instance": layout.name,
        "app.kubernetes.io/component": component,
    }


def scrape_annotations(layout: Layout) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(layout.http_port),
        "prometheus.io/path": "/metrics",
    }


def _env(layout: Layout, command: str) -> list[Obj]:
    env: list[Obj] = []
    if command == "serve":  # what --kv-advertise-host $(POD_IP) reads
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if layout.api_key:
        ref = {"secretKeyRef": {"name": layout.secret_name(), "key": API_KEY_KEY}}
        env.append({"name": api_key_env(command), "valueFrom": ref})
    return env


def _probe(path: str | None, port: str, period: int, failures: int) -> Obj:
    check: Obj = {"httpGet": {"path": path, "port": port}} if path else {"tcpSocket": {"port": port}}
    return {**check, "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": failures}


def _ports(layout: Layout, command: str) -> list[Obj]:
    ports: list[Obj] = [{"name": "http", "containerPort": layout.http_port, "protocol": "TCP"}]
    if command == "serve":
        ports.append({"name": "kv-control", "containerPort": layout.kv_port, "protocol": "TCP"})
        ports.append({"name": "kv-data", "containerPort": layout.kv_port + 1, "protocol": "TCP"})
    return ports


def container(layout: Layout, command: str, argv: list[str]) -> Obj:
    """The one container of a pdserve pod: `command` is serve or router, `argv` its command line."""
    mounts: list[Obj] = [{"name": "cluster-secret", "mountPath": SECRET_DIR, "readOnly": True}]
    resources: Obj = {}
    if command == "serve":
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        if layout.model_mount is not None:
            mounts.append({"name": "model", "mountPath": layout.model_mount, "readOnly": True})
        if layout.gpus:
            resources = {"limits": {"nvidia.com/gpu": str(layout.gpus)}}
    # an instance's /health answers once the weights are loaded (up to 30 min); the router's is 503
    # until some instance is healthy, which must not restart it: its startup and liveness are TCP
    own_health = "/health" if command == "serve" else None
    startup_failures = 180 if command == "serve" else 30
    return {
        "name": "pdserve",
        "image": layout.image,
        "command": argv[:1],
        "args": argv[1:],
        "env": _env(layout, command),
        "ports": _ports(layout, command),
        "resources": resources,
        "volumeMounts": mounts,
        "startupProbe": _probe(own_health, "http", 10, startup_failures),
        "readinessProbe": _probe("/health", "http", 5, 2),
        "livenessProbe": _probe(own_health, "http", 10, 6),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
    }


def volumes(layout: Layout, command: str) -> list[Obj]:
    secret: Obj = {
        "secretName": layout.secret_name(),
        "items": [{"key": SECRET_KEY_FILE, "path": SECRET_KEY_FILE}],
    }
    vols: list[Obj] = [{"name": "cluster-secret", "secret": {**secret, "defaultMode": 0o440}}]
    if command == "serve":
        vols.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        if layout.model_mount is not None:
            claim = layout.model_source or "llm-model"
            vols.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return vols


def pod_template(layout: Layout, component: str, command: str, argv: list[str]) -> Obj:
    """A PodTemplateSpec (`component`: prefill, decode or router)."""
    return {
        "metadata": {"labels": labels(layout, component), "annotations": scrape_annotations(layout)},
        "spec": {
            "terminationGracePeriodSeconds": GRACE_S,
            "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "fsGroup": USER_ID},
            "containers": [container(layout, command, argv)],
            "volumes": volumes(layout, command),
        },
    }

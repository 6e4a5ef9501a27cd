"""Plain Kubernetes, for clusters without RBG: a StatefulSet and a headless Service per role, a router
Deployment and the Service clients call.

    Service NAME (ClusterIP) -> Deployment NAME-router: pdserve router
                                  --prefill dns://NAME-prefill:PORT --decode dns://NAME-decode:PORT
    Service NAME-prefill (headless) -> StatefulSet NAME-prefill: N x pdserve serve --role prefill
    Service NAME-decode  (headless) -> StatefulSet NAME-decode:  M x pdserve serve --role decode

A headless Service's name resolves to the address of every ready pod behind it, and the router
re-resolves it every few seconds: `kubectl scale statefulset NAME-decode --replicas 3` is followed
without a restart or API permissions. With --registry the router reads the registry instead.
"""

from __future__ import annotations

from pdserve.deploy.common import INSTANCE_ROLES, Layout, router_argv, serve_argv
from pdserve.deploy.pods import Obj, labels, pod_template
from pdserve.deploy.render import secret_instructions, yaml_documents


def role_host(layout: Layout, role: str) -> str:
    return f"{layout.name}-{role}"


def dns_url(layout: Layout, role: str) -> str:
    return f"dns://{role_host(layout, role)}:{layout.http_port}"


def _service_ports(layout: Layout, instance: bool) -> list[Obj]:
    ports: list[Obj] = [{"name": "http", "port": layout.http_port, "targetPort": "http"}]
    if instance:
        ports.append({"name": "kv-control", "port": layout.kv_port, "targetPort": "kv-control"})
        ports.append({"name": "kv-data", "port": layout.kv_port + 1, "targetPort": "kv-data"})
    return ports


def headless_service(layout: Layout, role: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": role_host(layout, role), "labels": labels(layout, role)},
        "spec": {
            "clusterIP": "None",
            "selector": labels(layout, role),
            "ports": _service_ports(layout, True),
        },
    }


def statefulset(layout: Layout, role: str) -> Obj:
    argv = serve_argv(layout, role, "$(POD_IP)")  # Kubernetes expands $(VAR) from the env
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": role_host(layout, role), "labels": labels(layout, role)},
        "spec": {
            "serviceName": role_host(layout, role),
            "replicas": layout.count(role),
            "podManagementPolicy": "Parallel",  # instances are peers: no reason to start one by one
            "selector": {"matchLabels": labels(layout, role)},
            "template": pod_template(layout, role, "serve", argv),
        },
    }


def router_deployment(layout: Layout) -> Obj:
    argv = router_argv(layout, [dns_url(layout, "prefill")], [dns_url(layout, "decode")])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{layout.name}-router", "labels": labels(layout, "router")},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels(layout, "router")},
            "template": pod_template(layout, "router", "router", argv),
        },
    }


def router_service(layout: Layout, selector: dict[str, str]) -> Obj:
    """The Service clients call (OpenAI API on the router)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": layout.name, "labels": labels(layout, "router")},
        "spec": {"type": "ClusterIP", "selector": selector, "ports": _service_ports(layout, False)},
    }


def generate(layout: Layout, header: list[str]) -> dict[str, str]:
    """{file name: text}: one YAML file with every object."""
    docs: list[Obj] = []
    for role in INSTANCE_ROLES:
        docs += [headless_service(layout, role), statefulset(layout, role)]
    docs += [router_deployment(layout), router_service(layout, labels(layout, "router"))]
    text = yaml_documents([*header, *secret_instructions(layout)], docs)
    return {f"{layout.name}.yaml": text}

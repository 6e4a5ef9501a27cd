"""RoleBasedGroup (sgl-project/rbg, workloads.x-k8s.io/v1alpha1): the SGLang seed's layout with pdserve.

One RoleBasedGroup with three roles, as the seed's sglang-pd.yaml has them:

    router   1 x pdserve router --prefill dns://s-NAME-prefill:PORT --decode dns://s-NAME-decode:PORT
    prefill  N x pdserve serve --role prefill --tp T     (nvidia.com/gpu: T)
    decode   M x pdserve serve --role decode --tp T

The RBG controller gives every role a StatefulSet and a headless Service named s-NAME-ROLE (so pod i is
NAME-ROLE-i.s-NAME-ROLE); the router follows the headless Service by DNS, so scaling a role
(its `replicas`, or the RBG scaling adapter) needs no router restart. Clients call the ClusterIP
Service NAME, which selects the router role by the labels RBG puts on its pods.
"""

from __future__ import annotations

from pdserve.deploy.common import INSTANCE_ROLES, Layout, router_argv, serve_argv
from pdserve.deploy.kubernetes import router_service
from pdserve.deploy.pods import Obj, pod_template
from pdserve.deploy.render import secret_instructions, yaml_documents

API_VERSION = "workloads.x-k8s.io/v1alpha1"
GROUP_LABEL = "rolebasedgroup.workloads.x-k8s.io/name"
ROLE_LABEL = "rolebasedgroup.workloads.x-k8s.io/role"


def dns_url(layout: Layout, role: str) -> str:
    """The headless Service RBG makes for a role, as a dns:// URL the router re-resolves."""
    return f"dns://s-{layout.name}-{role}:{layout.http_port}"


def role(layout: Layout, name: str, replicas: int, template: Obj) -> Obj:
    return {
        "name": name,
        "replicas": replicas,
        "workload": {"apiVersion": "apps/v1", "kind": "StatefulSet"},
        "template": template,
    }


def group(layout: Layout) -> Obj:
    argv = router_argv(layout, [dns_url(layout, "prefill")], [dns_url(layout, "decode")])
    roles = [role(layout, "router", 1, pod_template(layout, "router", "router", argv))]
    for r in INSTANCE_ROLES:
        template = pod_template(layout, r, "serve", serve_argv(layout, r, "$(POD_IP)"))
        roles.append(role(layout, r, layout.count(r), template))
    return {
        "apiVersion": API_VERSION,
        "kind": "RoleBasedGroup",
        "metadata": {"name": layout.name},
        "spec": {"roles": roles},
    }


def generate(layout: Layout, header: list[str]) -> dict[str, str]:
    """{file name: text}: the RoleBasedGroup and the client Service."""
    selector = {GROUP_LABEL: layout.name, ROLE_LABEL: "router"}
    docs = [group(layout), router_service(layout, selector)]
    return {f"{layout.name}.yaml": yaml_documents([*header, *secret_instructions(layout)], docs)}

"""`pdserve deploy`: every generated manifest validates offline, runs command lines the real parsers
accept, holds no secret value, and the files committed in deploy/ are exactly what the commands in
deploy/README.md make now.

Kubernetes objects: kubernetes-validate's strict schemas of a pinned Kubernetes version (unknown
fields fail). RoleBasedGroup: its CRD fields against deploy/schemas/rolebasedgroup-v1alpha1.schema.json,
each role's pod template as a core/v1 PodTemplate. Compose: deploy/schemas/compose-subset.schema.json
plus the cross-references (secrets declared, router URLs naming services, GPUs not shared). EAS: its
documented JSON fields and the script's command line.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve.cli import build_parser, main
from pdserve.deploy.cli import generate
from pdserve.deploy.common import SECRET_DIR, Layout, LayoutError

K8S_VERSION = "1.32.0"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SEED = {"name": "pdserve-pd", "prefill": 2, "decode": 1, "tp": 2, "model": "/models/Qwen3-32B"}
LAYOUTS = {
    "seed": Layout(**SEED),  # type: ignore[arg-type]
    "default": Layout(),
    "cpu-no-key": Layout(name="tiny", device="cpu", image="pdserve:cpu", api_key=False, model="qwen2.5-0.5b"),
    "wide": Layout(name="big-one", prefill=3, decode=4, tp=8, model="/m/q", http_port=8080, kv_port=7000),
    "registry": Layout(name="reg", prefill=2, decode=2, registry="redis://redis:6379/0", model="/models/x"),
}
Obj = dict[str, Any]


def _schema(name: str) -> Obj:
    return json.loads((DEPLOY / "schemas" / name).read_text())


def _docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _only(files: dict[str, str]) -> str:
    assert len(files) == 1
    return next(iter(files.values()))


def _k8s_valid(obj: Obj) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod_template_valid(template: Obj) -> None:
    _k8s_valid({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def _check_parses(argv: list[str], secret_file: Path) -> Any:
    """The real `pdserve` parser accepts a generated command line (the secret file made real)."""
    assert argv[0] == "pdserve"
    args = [str(secret_file) if a.startswith(SECRET_DIR) else a for a in argv[1:]]
    if "--registry" in args and "--registry" not in _known_flags(args[0]):
        i = args.index("--registry")  # issue 24's registry, declared by another branch: parse the rest
        assert args[i + 1].startswith("redis://")
        del args[i : i + 2]
    return build_parser().parse_args(args)


def _known_flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {f for action in sub.choices[command]._actions for f in action.option_strings}


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_text("s" * 32)
    return path


def _check_instance_args(layout: Layout, args: Any, role: str) -> None:
    assert (args.command, args.role, args.tensor_parallel_size) == ("serve", role, layout.tp)
    assert (args.port, args.kv_port, args.host) == (layout.http_port, layout.kv_port, "0.0.0.0")
    assert args.metrics_public and args.cluster_secret is not None and args.api_key is None


def _check_router_args(layout: Layout, args: Any, prefill: list[str], decode: list[str]) -> None:
    assert (args.command, args.port, args.host, args.policy) == (
        "router",
        layout.http_port,
        "0.0.0.0",
        "round_robin",
    )
    assert args.metrics_public and args.cluster_secret is not None and args.api_key is None
    if layout.registry is None:
        assert (args.prefill, args.decode) == (prefill, decode)
    else:  # the registry is how it finds them
        assert args.prefill == args.decode == []


def _k8s_containers(docs: list[Obj]) -> list[tuple[Obj, Obj]]:
    """(pod template, its container) of every workload in the documents, RBG roles included."""
    out = []
    for doc in docs:
        templates = [r["template"] for r in doc["spec"]["roles"]] if doc["kind"] == "RoleBasedGroup" else []
        if doc["kind"] in ("StatefulSet", "Deployment"):
            templates = [doc["spec"]["template"]]
        out += [(t, t["spec"]["containers"][0]) for t in templates]
    return out


def _check_pod(layout: Layout, template: Obj, container: Obj, secret_file: Path) -> tuple[str, Any]:
    """One pod's contract; returns its component and parsed command line."""
    component = template["metadata"]["labels"]["app.kubernetes.io/component"]
    args = _check_parses(container["command"] + container["args"], secret_file)
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/scrape"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    # SIGTERM comes after the preStop sleep, then the process drains: both fit in the grace period
    grace = template["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(prestop[1]) + args.drain_timeout + 10, (grace, prestop, args.drain_timeout)
    env = {e["name"]: e for e in container.get("env", [])}
    key_env = "PDSERVE_ROUTER_API_KEY" if component == "router" else "PDSERVE_API_KEY"
    assert (key_env in env) == layout.api_key
    assert all("value" not in e for e in env.values()), "a secret inline"
    if component != "router":
        _check_instance_args(layout, args, component)
        assert args.kv_advertise_host == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (str(layout.tp) if layout.device == "cuda" else None)
    else:  # its /health is 503 while no instance is: that takes it out of the Service, never restarts it
        assert "tcpSocket" in container["startupProbe"] and "tcpSocket" in container["livenessProbe"]
    return component, args


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_kubernetes_manifests_validate(name: str, secret_file: Path) -> None:
    layout = LAYOUTS[name]
    docs = _docs(_only(generate("kubernetes", layout)))
    for doc in docs:
        _k8s_valid(doc)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Service", "Service", "Service", "StatefulSet", "StatefulSet"]
    headless = {d["metadata"]["name"] for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP")}
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in docs if d["kind"] == "StatefulSet"}
    assert replicas == {f"{layout.name}-prefill": layout.prefill, f"{layout.name}-decode": layout.decode}
    assert headless == set(replicas)
    port = layout.http_port
    for template, container in _k8s_containers(docs):
        component, args = _check_pod(layout, template, container, secret_file)
        if component == "router":
            urls = [f"dns://{layout.name}-{r}:{port}" for r in ("prefill", "decode")]
            _check_router_args(layout, args, urls[:1], urls[1:])


def _check_rbg(layout: Layout, docs: list[Obj], secret_file: Path) -> None:
    group, service = docs
    jsonschema.validate(group, _schema("rolebasedgroup-v1alpha1.schema.json"))
    _k8s_valid(service)
    roles = {r["name"]: r["replicas"] for r in group["spec"]["roles"]}
    assert roles == {"router": 1, "prefill": layout.prefill, "decode": layout.decode}
    selector = service["spec"]["selector"]
    assert selector == {
        "rolebasedgroup.workloads.x-k8s.io/name": layout.name,
        "rolebasedgroup.workloads.x-k8s.io/role": "router",
    }
    for template, container in _k8s_containers([group]):
        _pod_template_valid(template)
        component, args = _check_pod(layout, template, container, secret_file)
        if component == "router":  # RBG's headless Service of a role: s-GROUP-ROLE
            urls = [f"dns://s-{layout.name}-{r}:{layout.http_port}" for r in ("prefill", "decode")]
            _check_router_args(layout, args, urls[:1], urls[1:])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_rbg_manifests_validate(name: str, secret_file: Path) -> None:
    _check_rbg(LAYOUTS[name], _docs(_only(generate("rbg", LAYOUTS[name]))), secret_file)


def test_the_rbg_schema_rejects_what_the_crd_rejects() -> None:
    """The hand-written schema is no rubber stamp: a misspelt or wrongly typed field fails."""
    group = _docs(_only(generate("rbg", LAYOUTS["seed"])))[0]
    schema = _schema("rolebasedgroup-v1alpha1.schema.json")
    for broken in (
        {"replica": 2},
        {"replicas": -1},
        {"workload": {"kind": "Job"}},
        {"templateRef": {"name": "x"}},
    ):
        role = {**group["spec"]["roles"][1], **broken}
        bad = {**group, "spec": {"roles": [role]}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(kubernetes_validate.ValidationError):  # the pod template, by Kubernetes' schema
        template = group["spec"]["roles"][1]["template"]
        _pod_template_valid({**template, "spec": {**template["spec"], "containerz": []}})


def _unescape(word: str) -> str:
    """Compose's `$$` is a literal `$`; a lone `$` would be interpolated from the host's env."""
    assert re.search(r"(?<!\$)\$(?!\$)", word.replace("$$", "")) is None, word
    return word.replace("$$", "$")


def _check_compose(layout: Layout, doc: Obj, secret_file: Path) -> None:
    jsonschema.validate(doc, _schema("compose-subset.schema.json"))
    services = doc["services"]
    names = [f"{r}-{i}" for r in ("prefill", "decode") for i in range(layout.count(r))]
    assert sorted(services) == sorted(["router", *names])
    gpus: list[str] = []
    for name, svc in services.items():
        assert {s["source"] for s in svc["secrets"]} <= set(doc["secrets"])
        if layout.api_key:
            script = _unescape(svc["entrypoint"][2])
            assert script.endswith('exec "$@"') and "cat /run/secrets/api-key" in script
        args = _check_parses([_unescape(w) for w in svc["command"]], secret_file)
        if name == "router":
            urls = {
                r: [f"http://{n}:{layout.http_port}" for n in names if n.startswith(r)]
                for r in ("prefill", "decode")
            }
            _check_router_args(layout, args, urls["prefill"], urls["decode"])
            continue
        _check_instance_args(layout, args, name.split("-")[0])
        assert args.kv_advertise_host == name
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus += [g for d in devices for g in d["device_ids"]]
    expected = layout.tp * (layout.prefill + layout.decode) if layout.device == "cuda" else 0
    assert len(gpus) == len(set(gpus)) == expected, "each instance its own GPUs"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_compose_files_validate(name: str, secret_file: Path) -> None:
    (doc,) = _docs(_only(generate("compose", LAYOUTS[name])))
    _check_compose(LAYOUTS[name], doc, secret_file)


def _check_eas(layout: Layout, services: list[Obj], secret_file: Path) -> None:
    assert [s["metadata"]["name"] for s in services] == [
        f"{layout.name}_{r}".replace("-", "_") for r in ("prefill", "decode")
    ]
    for svc, role in zip(services, ("prefill", "decode"), strict=True):
        meta = svc["metadata"]
        assert re.fullmatch(r"[a-z0-9_]{3,63}", meta["name"]) and meta["group"] == layout.name.replace(
            "-", "_"
        )
        assert meta["instance"] == layout.count(role) and meta.get("gpu", 0) == layout.gpus
        assert {m["mount_path"] for m in svc["storage"]} >= {SECRET_DIR}
        (container,) = svc["containers"]
        assert set(container) == {"image", "script", "port"} and container["port"] == layout.http_port
        words = shlex.split(container["script"])
        assert ("exec" in words) and (
            words[0].startswith("PDSERVE_API_KEY=") or words[0] == "export"
        ) == layout.api_key
        args = _check_parses(words[words.index("exec") + 1 :], secret_file)
        _check_instance_args(layout, args, role)
        assert args.kv_advertise_host == "$(hostname -i)"


@pytest.mark.parametrize("name", ["registry", "seed-registry"])
def test_eas_service_group(name: str, secret_file: Path) -> None:
    layout = LAYOUTS["registry"] if name == "registry" else Layout(**SEED, registry="redis://r:6379")  # type: ignore[arg-type]
    _check_eas(layout, json.loads(_only(generate("eas", layout))), secret_file)


def test_bad_layouts_are_refused_at_the_edge(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(LayoutError, match="registry"):
        generate("eas", LAYOUTS["seed"])
    assert main(["deploy", "eas", "--prefill", "1"]) == 2  # no registry: EAS has no per-instance DNS
    assert main(["deploy", "rbg", "--name", "Bad_Name"]) == 2
    assert main(["deploy", "kubernetes", "--registry", "http://x"]) == 2
    assert main(["deploy", "kubernetes", "--kv-port", "65535"]) == 2


def _readme_commands() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", (DEPLOY / "README.md").read_text(), re.S)
    assert block is not None
    return [
        shlex.split(line)[1:] for line in block.group(1).splitlines() if line.startswith("pdserve deploy")
    ]


def test_committed_examples_are_a_fresh_generation(tmp_path: Path, secret_file: Path) -> None:
    commands = _readme_commands()
    assert {c[1] for c in commands} == {"rbg", "kubernetes", "compose", "eas"}
    committed = 0
    for argv in commands:
        out = Path(argv[argv.index("--output") + 1])
        fresh = tmp_path / out
        assert main([*argv[: argv.index("--output")], "--output", str(fresh)]) == 0
        for path in fresh.iterdir():
            text = (ROOT / out / path.name).read_text()
            assert text == path.read_text(), (
                f"{out / path.name} differs: run the commands of deploy/README.md"
            )
            committed += 1
    assert committed == len(commands)
    for path in (DEPLOY / "kubernetes").glob("*.yaml"):
        for doc in _docs(path.read_text()):
            _k8s_valid(doc)
    for path in (DEPLOY / "rbg").glob("*.yaml"):
        _check_rbg(Layout(**SEED), _docs(path.read_text()), secret_file)  # type: ignore[arg-type]


def test_no_file_in_deploy_holds_a_secret_value() -> None:
    """Secrets come from the Secret (by reference) or a mounted file, never as a literal."""
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "kind: Secret" not in text and "stringData" not in text, path
            assert not re.search(r'PDSERVE_(ROUTER_)?API_KEY=(?!\\?"\$)', text), path


def _docker_runs() -> bool:
    docker = shutil.which("docker")
    return (
        docker is not None
        and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0
    )


@pytest.mark.slow
@pytest.mark.skipif(not _docker_runs(), reason="no container engine runs here (docker info fails)")
def test_the_cpu_image_builds_and_knows_the_commands() -> None:
    build = ["docker", "build", "-f", "deploy/Dockerfile.cpu", "-t", "pdserve:cpu-test", "."]
    subprocess.run(build, cwd=ROOT, check=True, timeout=3000)
    for command in ("serve", "up", "router"):
        run = ["docker", "run", "--rm", "pdserve:cpu-test", "pdserve", command, "--help"]
        assert subprocess.run(run, capture_output=True, timeout=300).returncode == 0


def test_the_cpu_image_installs_as_make_install_does() -> None:
    """Without a container engine: the CPU image runs the README's `make install`, every file it copies
    passes .dockerignore, and its user is the one the manifests' securityContext names."""
    dockerfile = (DEPLOY / "Dockerfile.cpu").read_text()
    assert re.search(r"^RUN .*\bmake install\b", dockerfile, re.M)
    assert 'CMD ["pdserve", "up"' in dockerfile and "useradd --uid 1000" in dockerfile
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for source in line.split():
            assert source in allowed and (ROOT / source).exists(), source
    template = _docs(_only(generate("kubernetes", LAYOUTS["seed"])))[1]["spec"]["template"]
    assert template["spec"]["securityContext"]["runAsUser"] == 1000

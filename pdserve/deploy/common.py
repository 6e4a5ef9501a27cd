"""The shared model of one deployment layout, and the command lines every target runs.

A `Layout` says what runs (N prefill + M decode instances of TP T, one router, the model's path in
the container, ports, how instances are found); each target (kubernetes.py, rbg.py, compose.py,
eas.py) only says where it runs. The command lines are built from the flags the real parsers declare
(pdserve/options.py OPTIONS for `serve`, the `router` sub-parser for the router), never from copies of
their spelling, so a renamed flag changes every manifest at the next generation.

Secrets never appear in a generated file: the cluster secret is a file mounted from a Kubernetes Secret
(or a compose secret, or an EAS storage mount), and the API key comes from the same Secret through the
environment variable each command reads ($PDSERVE_API_KEY, $PDSERVE_ROUTER_API_KEY).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import cache

from pdserve.options import API_KEY_ENV, BY_NAME
from pdserve.router.cli_commands import API_KEY_ENV as ROUTER_API_KEY_ENV
from pdserve.router.cli_commands import add_router_parser

INSTANCE_ROLES = ("prefill", "decode")
SECRET_DIR = "/etc/pdserve/secret"  # where the cluster's Secret is mounted in every container
SECRET_KEY_FILE = "cluster-secret"  # the Secret's key (and file name) holding the cluster secret
API_KEY_KEY = "api-key"  # the Secret's key holding the API key
REGISTRY_FLAG = "--registry"  # until `serve`/`router` declare it, the spelling issue 24 gives it
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$")  # a DNS label, room for suffixes
__all__ = ["API_KEY_ENV", "ROUTER_API_KEY_ENV", "Layout", "LayoutError"]


class LayoutError(ValueError):
    """A layout that no target can deploy (bad name, counts, registry URL)."""


@dataclass(frozen=True)
class Layout:
    """What runs: the roles and their counts, the model, the ports, how the router finds instances."""

    name: str = "pdserve"
    prefill: int = 1
    decode: int = 1
    tp: int = 1
    model: str | None = None  # its path in the container, or a shape name; None: the image's default
    image: str = "pdserve:cuda"
    device: str = "cuda"  # cuda: nvidia.com/gpu = tp per instance; cpu: none
    http_port: int = 8000
    kv_port: int = 9000  # KV control; the data connections use the next port
    registry: str | None = None  # redis://HOST:PORT[/DB]: instances register, the router reads
    model_source: str | None = None  # where the model comes from; each target says what it means
    api_key: bool = True  # wire the API key from the Secret into every instance and the router
    policy: str = "round_robin"

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise LayoutError(f"name {self.name!r}: lowercase letters, digits and '-', at most 42")
        if self.prefill < 1 or self.decode < 1 or self.tp < 1:
            raise LayoutError("--prefill, --decode and --tp must each be at least 1")
        if self.device not in ("cuda", "cpu"):
            raise LayoutError(f"device {self.device!r}: cuda or cpu")
        if self.registry is not None and not self.registry.startswith("redis://"):
            raise LayoutError(f"registry {self.registry!r}: give redis://HOST:PORT[/DB]")
        if not 0 < self.http_port < 65536 or not 0 < self.kv_port < 65535:
            raise LayoutError("ports must be within 1..65535 (the KV data port is --kv-port + 1)")

    @property
    def gpus(self) -> int:
        """GPUs one instance needs: its TP ranks on CUDA, none on CPU."""
        return self.tp if self.device == "cuda" else 0

    @property
    def model_mount(self) -> str | None:
        """Where to mount the model in the container: its path (a shape name or none: nothing)."""
        return self.model if self.model is not None and self.model.startswith("/") else None

    def count(self, role: str) -> int:
        return self.prefill if role == "prefill" else self.decode

    def secret_name(self) -> str:
        return f"{self.name}-secrets"


def serve_flag(name: str) -> str:
    """`pdserve serve`'s flag for an option of OPTIONS (its first spelling)."""
    return BY_NAME[name].flags[0]


@cache
def router_flags() -> dict[str, str]:
    """`pdserve router`'s flags by argparse dest, read from the real sub-parser."""
    sub = argparse.ArgumentParser().add_subparsers()
    add_router_parser(sub)
    router = sub.choices["router"]
    return {a.dest: a.option_strings[0] for a in router._actions if a.option_strings}


def registry_flag(command: str) -> str:
    """`--registry` as `serve` or `router` spells it, once they declare it."""
    if command == "serve":
        return BY_NAME["registry"].flags[0] if "registry" in BY_NAME else REGISTRY_FLAG
    return router_flags().get("registry", REGISTRY_FLAG)


def secret_path() -> str:
    return f"{SECRET_DIR}/{SECRET_KEY_FILE}"


def serve_argv(layout: Layout, role: str, advertise_host: str) -> list[str]:
    """One instance's command line. `advertise_host`: how peers reach it (the pod IP, a name)."""
    argv = ["pdserve", "serve", serve_flag("role"), role]
    if layout.model is not None:
        argv += [serve_flag("model"), layout.model]
    argv += [serve_flag("tensor_parallel_size"), str(layout.tp)]
    if layout.device == "cpu":
        argv += [serve_flag("device"), "cpu"]
    argv += [serve_flag("host"), "0.0.0.0", serve_flag("port"), str(layout.http_port)]
    argv += [serve_flag("kv_port"), str(layout.kv_port), serve_flag("kv_advertise_host"), advertise_host]
    argv += [serve_flag("cluster_secret"), secret_path(), serve_flag("metrics_public")]
    if layout.registry is not None:
        argv += [registry_flag("serve"), layout.registry]
    return argv


def router_argv(layout: Layout, prefill: list[str], decode: list[str]) -> list[str]:
    """The router's command line: instances by URL (dns://NAME:PORT, http://...), or by registry."""
    flags = router_flags()
    argv = ["pdserve", "router"]
    if layout.registry is not None:
        argv += [registry_flag("router"), layout.registry]
    else:
        argv += [flags["prefill"], *prefill, flags["decode"], *decode]
    argv += [flags["host"], "0.0.0.0", flags["port"], str(layout.http_port), flags["policy"], layout.policy]
    argv += [flags["cluster_secret"], secret_path(), flags["metrics_public"]]
    return argv


def api_key_env(command: str) -> str:
    """The environment variable the command reads its API key from."""
    return API_KEY_ENV if command == "serve" else ROUTER_API_KEY_ENV


def generated_by(argv: list[str]) -> str:
    """The header line every generated file carries: how to make it again."""
    return "generated by: pdserve deploy " + " ".join(argv) + " (do not edit; regenerate)"

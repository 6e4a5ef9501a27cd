"""Who and where an instance is: the facts a peer needs to pick a KV path (same host? same process?
which GPU?) and to tell that a process on this host has gone (so it can no longer write anywhere).

Same host means the same kernel boot id (containers on one machine share it; hostnames may differ).
Liveness is only judged inside one PID namespace, by pid and start time (so a reused pid is not
mistaken for the old process); anywhere else the answer is "unknown", never "gone".
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process, or None if there is no such process."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def local_identity() -> dict[str, Any]:
    stat = _stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pid_namespace(),
        "pid": os.getpid(),
        "start": stat[1] if stat else "",
    }


def same_host(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a.get("boot")) and a.get("boot") == b.get("boot")


def same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("pidns", "pid", "start")
    return same_host(a, b) and all(a.get(k) == b.get(k) for k in keys) and bool(a.get("pidns"))


def process_gone(ident: dict[str, Any]) -> bool:
    """True only when `ident` names a process of this host and PID namespace that no longer runs."""
    me = local_identity()
    if not same_host(me, ident) or not me["pidns"] or me["pidns"] != ident.get("pidns"):
        return False
    try:
        stat = _stat(int(ident.get("pid", 0)))
    except (TypeError, ValueError):
        return False
    return stat is None or stat[1] != ident.get("start") or stat[0] in ("Z", "X")


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same in every process, whatever CUDA_VISIBLE_DEVICES numbers it."""
    return str(torch.cuda.get_device_properties(device).uuid)


def local_gpu(uuid: str) -> int | None:
    """This process's index of the GPU with that UUID, or None if it cannot see that GPU."""
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", index)) == uuid:
            return index
    return None

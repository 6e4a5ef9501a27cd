"""Where `pdserve up`'s instances run: which GPUs each one sees, how many CPU threads each one uses.

On GPUs, instance i gets the next `tp` GPUs (its own --tp; `up --prefill-tp/--decode-tp` may differ)
of the list (`--gpus 0,1,2,3`, default every visible one)
through CUDA_VISIBLE_DEVICES; with more instances than GPUs they wrap around and share, and the user
is warned to lower --gpu-memory-utilization. On CPU, the cores are split evenly between instances
(OMP_NUM_THREADS), since several PyTorch processes each taking every core slow each other down.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without initializing CUDA here (nvidia-smi, or the env)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_groups(tps: Sequence[int], gpus: Sequence[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each instance: tps[i] GPUs for instance i, the next ones of the list,
    wrapping around when there are too few (a group never straddles the end of the list)."""
    if not gpus:
        return []
    for tp in sorted(set(tps)):
        if len(gpus) < tp:
            listed = ",".join(gpus)
            raise ValueError(f"--tp {tp} needs {tp} GPUs per instance; only {len(gpus)} given ({listed})")
    if sum(tps) > len(gpus):
        logger.warning(
            "%d instances need %d GPUs > %d: instances share GPUs; lower --gpu-memory-utilization",
            len(tps),
            sum(tps),
            len(gpus),
        )
    groups = []
    cursor = 0
    for tp in tps:
        start = cursor % len(gpus)
        if start + tp > len(gpus):
            start = 0
        groups.append(",".join(gpus[start : start + tp]))
        cursor = start + tp
    return groups


def instance_envs(tps: Sequence[int], device: str, gpus: str | None) -> list[dict[str, str]]:
    """The environment additions of each instance (tps: each one's tensor-parallel size)."""
    use_gpus = device != "cpu" and (gpus is not None or device == "cuda" or bool(visible_gpus()))
    if use_gpus:
        listed = [g for g in gpus.split(",") if g] if gpus else visible_gpus()
        groups = gpu_groups(tps, listed)
        if groups:
            return [{"CUDA_VISIBLE_DEVICES": g} for g in groups]
    threads = max(1, (os.cpu_count() or 1) // max(1, len(tps)))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in tps]


def option_value(args: Sequence[str], names: Sequence[str], default: str) -> str:
    """The last value given to one of `names` in a pass-through argument list (`--x v` or `--x=v`)."""
    value = default
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value

"""How the suite runs on several pytest-xdist workers (`make test`: `-n 2 --dist loadgroup`).

- One torch thread per worker: two workers each taking every core slow each other down (and every
  server a test starts inherits OMP_NUM_THREADS=1).
- A unit of work is a test file, or a group of files that share an expensive session fixture (GROUPS):
  a unit runs whole on one worker, so its module and group fixtures (servers, clusters) start once.
  xdist's own `xdist_group` marks do nothing under pytest 9 (xdist 3.8 renames items through
  `item._nodeid`, which pytest 9 no longer reads), hence the scheduler here (`UnitScheduling`,
  picked by `--dist loadgroup` through tests/conftest.py).
- Units are handed out heaviest first (HEAVY; the rest in collection order), so that the last unit a
  worker takes is a short one and both workers end at about the same time.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# files that share a session fixture private to them: tests/e2e/conftest.py
GROUPS = {
    "tests/e2e/test_internal_auth.py": "pair-1p1d",
    "tests/e2e/test_structured_output.py": "pair-1p1d",
}
# Slowest first: each unit's total seconds under `make test` on two busy cores (--durations=0, Dec 2026);
# a unit not named here took under ~50 s. Re-measure when a file grows: a heavy unit taken last makes
# the other worker wait.
HEAVY: list[str] = [
    "tests/engine/test_greedy_equivalence.py",  # 460
    "tests/e2e/test_disagg.py",  # 290
    "tests/engine/test_overlap_outputs.py",  # 245
    "tests/e2e/test_nothing_lost.py",  # 225
    "tests/e2e/test_resume.py",  # 210
    "tests/engine/test_tensor_parallel.py",  # 205
    "tests/engine/test_disagg_offline.py",  # 160
    "tests/e2e/test_router.py",  # 155
    "tests/engine/test_resume.py",  # 135
    "tests/e2e/test_registry.py",  # 110
    "tests/engine/test_disagg_transports.py",  # 100
    "pair-1p1d",  # 95
    "tests/e2e/test_api_surface.py",  # 95
    "tests/kernels/test_triton_sampler.py",  # 90
    "tests/engine/test_structured.py",  # 90
    "tests/e2e/test_server.py",  # 85
    "tests/engine/test_tp_disagg.py",  # 85
    "tests/fuzz/test_control_fuzz.py",  # 70
    "tests/e2e/test_bench.py",  # 65
    "tests/e2e/test_entry_instances.py",  # 65
    "tests/fuzz/test_http_fuzz.py",  # 50
    "tests/e2e/test_planning.py",  # 50
]


def distributed(config: pytest.Config) -> bool:
    """Is this a pytest-xdist worker (or the controller) of a run over several processes?"""
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) or bool(getattr(config.option, "numprocesses", 0))


def one_thread_per_worker() -> None:
    """Within a worker: one OpenMP/torch thread, here and in every process a test starts."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def unit_of_nodeid(nodeid: str) -> str:
    """The unit a test belongs to: its file's group, else its file."""
    path = nodeid.split("::", 1)[0]
    return GROUPS.get(path, path)


def unit_of(item: pytest.Item) -> str:
    return unit_of_nodeid(item.nodeid)


def plan(items: list[pytest.Item]) -> None:
    """Order the items unit by unit, heaviest unit first (stable otherwise). Every worker collects
    the same order, which is the order the scheduler hands the units out in."""
    rank = {unit: i for i, unit in enumerate(HEAVY)}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(unit_of(item), index)

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        unit = unit_of(pair[1])
        return (rank.get(unit, len(HEAVY)), first_seen[unit], pair[0])

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: xdist's load-by-scope scheduling, a unit (unit_of_nodeid) per scope, in
    collection order (which `plan` made heaviest first); any other --dist: xdist's own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_nodeid(nodeid)

    config.option.loadscopereorder = False  # keep the collection's (heavy-first) order
    return UnitScheduling(config, log)

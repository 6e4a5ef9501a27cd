"""How the suite runs on several pytest-xdist workers (`make test`: `-n 2 --dist loadgroup`).

- One torch thread per worker: two workers each taking every core slow each other down (and every
  server a test starts inherits OMP_NUM_THREADS=1).
- A test file is one unit of work, as with `--dist loadfile`: its module fixtures (servers, clusters)
  start once. Files that share an expensive session fixture carry one `xdist_group` mark (see
  tests/e2e/conftest.py) and so run on the same worker.
- The units are handed out heaviest first (`--no-loadscope-reorder` keeps this order), so the last
  unit a worker takes is a short one and both workers end at about the same time. HEAVY lists the
  slow units, by their measured wall time on two cores; every other file follows in collection order.
"""

from __future__ import annotations

import os

import pytest

GROUP = "xdist_group"
# slowest first (seconds on 2 busy cores, measured with --durations); a file not named here is short
HEAVY: list[str] = []


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


def unit_of(item: pytest.Item) -> str:
    """The work unit an item belongs to: its xdist group, else its file."""
    mark = item.get_closest_marker(GROUP)
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return item.nodeid.split("::", 1)[0]


def plan(items: list[pytest.Item]) -> None:
    """Group every ungrouped item by its file, then order the units heaviest first (stable)."""
    for item in items:
        if item.get_closest_marker(GROUP) is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    rank = {unit: i for i, unit in enumerate(HEAVY)}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(unit_of(item), index)

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        unit = unit_of(pair[1])
        return (rank.get(unit, len(HEAVY)), first_seen[unit], pair[0])

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]

"""The e2e fixtures that several test files share: each such file carries the fixture's xdist group
mark, so that under `make test` (pytest-xdist, --dist loadgroup) they run on one worker, which starts
the cluster once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Pair


@pytest.fixture(scope="session")
def pair(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The 1P1D cluster of test_internal_auth.py and test_structured_output.py (group PAIR_GROUP)."""
    cluster = Pair(model_dir, tmp_path_factory.mktemp("pair-1p1d"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

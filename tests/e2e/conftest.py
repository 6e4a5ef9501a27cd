"""The e2e fixtures that several test files share. The files that use one are a group in
tests/parallel.py (GROUPS): under `make test` they run on one worker, which starts the fixture once,
and tests/lifetimes.py ends it once the group is done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Pair


@pytest.fixture(scope="session")
def pair(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The 1P1D cluster of test_internal_auth.py and test_structured_output.py (group "pair-1p1d")."""
    cluster = Pair(model_dir, tmp_path_factory.mktemp("pair-1p1d"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

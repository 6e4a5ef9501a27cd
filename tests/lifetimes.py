"""Expensive fixtures end with the last test that needs them, not with their scope.

A module-scoped cluster would otherwise live until its file's last test, idle, holding a GiB or more
per instance, while the next cluster of the same file starts (test_disagg.py's `pdserve up` pair next
to its 2P2D). After each test, every module-scoped fixture that no later test of the same work unit
(its file, or its xdist group: tests/parallel.py) asks for is finished now, its teardown reported on
that test. The session fixtures private to one xdist group (SHARED) end the same way, once their
group is done. A fixture finished early is started again if a later test asks for it after all
(pytest executes a fixture whose cached value is gone), so this changes when teardown happens, never
what a test sees.
"""

from __future__ import annotations

import pytest

from tests.parallel import unit_of

SHARED = {"pair"}  # session-scoped, but only one xdist group uses it (tests/e2e/conftest.py)
_later_needs: dict[str, frozenset[str]] = {}  # nodeid -> the fixtures later tests of its unit use


def plan_releases(items: list[pytest.Item]) -> None:
    """For each item: the fixture names that any later item of its unit needs (run order = `items`)."""
    _later_needs.clear()
    needed: dict[str, frozenset[str]] = {}
    for item in reversed(items):
        unit = unit_of(item)
        later = needed.get(unit, frozenset())
        _later_needs[item.nodeid] = later
        needed[unit] = later | frozenset(getattr(item, "fixturenames", ()))


def release_unneeded(item: pytest.Item) -> None:
    """Finish the module (and SHARED) fixtures `item` used that no later test of its unit needs."""
    later = _later_needs.get(item.nodeid)
    info = getattr(item, "_fixtureinfo", None)
    if later is None or info is None:
        return
    for name in getattr(item, "fixturenames", ()):
        defs = info.name2fixturedefs.get(name)
        if name in later or not defs:
            continue
        fixturedef = defs[-1]
        if fixturedef.cached_result is None:
            continue
        if fixturedef.scope == "module" or (name in SHARED and fixturedef.scope == "session"):
            fixturedef.finish(item._request)  # type: ignore[attr-defined]

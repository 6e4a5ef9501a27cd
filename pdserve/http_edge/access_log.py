"""Health, info and metrics polls out of the access log: the router polls every instance twice a
second, and those lines would bury the requests and failures the log is read for.

A poll that failed (status >= 400) stays in: that is the line someone is looking for.
"""

from __future__ import annotations

import logging

POLL_PATHS = frozenset({"/health", "/pd/info", "/metrics"})
ACCESS_LOGGER = "uvicorn.access"


class PollFilter(logging.Filter):
    """Drops uvicorn's access lines for successful GETs of POLL_PATHS."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:  # (client, method, path, version, status)
            return True
        _, method, path, _, status = args
        is_poll = method == "GET" and str(path).split("?", 1)[0] in POLL_PATHS
        return not (is_poll and isinstance(status, int) and status < 400)


def quiet_polls(enabled: bool) -> None:
    """Leave polls out of the access log (once per process), or keep them (`enabled` False)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    present = [f for f in logger.filters if isinstance(f, PollFilter)]
    if enabled and not present:
        logger.addFilter(PollFilter())
    for f in present if not enabled else ():
        logger.removeFilter(f)

"""When each request of a run arrives: all at once, at a constant rate, or as a Poisson process.

    all at once (rate inf)   0    0    0    0   ...
    constant  (rate r)       0   1/r  2/r  3/r  ...         exactly i/r, no drift
    poisson   (rate r)       0   e1  e1+e2 ...              e_k ~ Exponential(mean 1/r), seeded

The first request arrives at 0 in every schedule, so a run's clock starts with its first request, as
guidellm's and aiperf's do. With a duration limit only arrivals before the limit are sent; how many
prompts that takes is `prompts_for_duration`. This module knows nothing about HTTP.
"""

from __future__ import annotations

import math
import random

ARRIVALS = ("poisson", "constant")
POISSON_SLACK_SIGMAS = 4.0  # prompts made beyond the mean count, in standard deviations


def arrival_offsets(num: int, rate: float, rng: random.Random, arrival: str = "poisson") -> list[float]:
    """Seconds from the start at which each of `num` requests arrives (see the module docstring)."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive: {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}: {arrival!r}")
    if math.isinf(rate):
        return [0.0] * num
    if arrival == "constant":
        return [i / rate for i in range(num)]
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def prompts_for_duration(rate: float, duration: float, arrival: str = "poisson") -> int | None:
    """Prompts to make so that arrivals last `duration` seconds at `rate`; None when the rate is inf
    (then how many a run takes depends on the server, not on the schedule).

    constant: arrivals at i/r < duration, so ceil(r x duration). Poisson: the count before `duration` has
    mean and variance r x duration; four standard deviations more run out once in ~30,000 runs.
    """
    if math.isinf(rate):
        return None
    mean = rate * duration
    if arrival == "constant":
        return max(1, math.ceil(mean - 1e-9))
    return max(1, math.ceil(mean + POISSON_SLACK_SIGMAS * math.sqrt(mean)) + 1)

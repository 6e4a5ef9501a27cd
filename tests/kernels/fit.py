"""A goodness-of-fit check for the sampler's frequency tests: Pearson's chi-square of draw counts
against the distribution they should follow."""

from __future__ import annotations

import torch

ALPHA = 1e-6  # the chance that a correct sampler fails one such check (the chi-square tail)


def fit_pvalue(counts: torch.Tensor, want: torch.Tensor) -> float:
    """The chi-square p-value of `counts` [k] drawn from `want` [k]. Categories are pooled, smallest
    first, until each bin expects 5 draws or more, so that the chi-square law holds; categories
    with want == 0 are left out (a caller checks that none was drawn)."""
    n = float(counts.sum())
    observed: list[float] = []
    expected: list[float] = []
    o = e = 0.0
    for i in want.argsort().tolist():
        if want[i] <= 0:
            continue
        o, e = o + float(counts[i]), e + float(want[i]) * n
        if e >= 5:
            observed.append(o)
            expected.append(e)
            o = e = 0.0
    if e > 0 and observed:
        observed[-1] += o
        expected[-1] += e
    if len(observed) < 2:
        return 1.0
    stat = sum((a - b) ** 2 / b for a, b in zip(observed, expected, strict=True))
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(stat / 2, dtype=torch.float64)))


def fits(counts: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether `counts` pass the check: nothing drawn where want is 0, and a chi-square p-value
    of at least ALPHA."""
    return int(counts[want == 0].sum()) == 0 and fit_pvalue(counts, want) >= ALPHA

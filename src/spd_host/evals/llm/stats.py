"""Score statistics shared by the judge suites: Pearson correlation and AUROC, in float64.

Both return ``None`` where the statistic is undefined (a constant series; one class empty),
so a caller records "no score" instead of a NaN or a made-up zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two aligned series (``numpy.corrcoef(x, y)[0, 1]``); ``None`` when
    either is constant or they are shorter than 2."""
    if len(x) != len(y):
        raise ValueError(f"pearson: series of different lengths ({len(x)} vs {len(y)})")
    n = len(x)
    if n < 2:
        return None
    mx = math.fsum(x) / n
    my = math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx <= 0.0 or syy <= 0.0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve of a score separating ``positives`` from ``negatives``: the
    probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney U statistic over ``len(pos) * len(neg)``, as ``sklearn``'s
    ``roc_auc_score``). ``None`` when either class is empty."""
    if not positives or not negatives:
        return None
    ranked = sorted([(float(s), 1) for s in positives] + [(float(s), 0) for s in negatives])
    rank_sum_pos = 0.0  # average 1-based ranks over tied scores
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        rank_sum_pos += mean_rank * sum(lab for _, lab in ranked[i : j + 1])
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values; ``None`` if none is defined."""
    ok = [v for v in values if v is not None]
    return math.fsum(ok) / len(ok) if ok else None

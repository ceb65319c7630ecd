"""Score statistics shared by the judge suites: Pearson correlation and AUROC.

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
    """AUROC of a score separating ``positives`` from ``negatives`` (ties count one half);
    ``None`` when either class is empty. One implementation for every suite:
    :func:`spd_host.evals.llm.scoring.auroc` (labels, scores)."""
    from spd_host.evals.llm.scoring import auroc as auroc_of

    labels = [True] * len(positives) + [False] * len(negatives)
    return auroc_of(labels, [float(s) for s in [*positives, *negatives]])


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the defined values; ``None`` if none is defined."""
    ok = [v for v in values if v is not None]
    return math.fsum(ok) / len(ok) if ok else None

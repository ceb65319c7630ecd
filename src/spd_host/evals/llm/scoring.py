"""delphi's aggregation of detection / fuzzing answers: one confusion matrix over examples.

delphi (EleutherAI) scores a label by asking a judge, per example, "does it fire" (detection) or
"are the marks right" (fuzzing), and aggregates every example of every component into *one*
confusion matrix (micro averaging), from which it reports precision, recall, F1 and a
class-balanced accuracy; AUROC from the judge's ``P(1)`` where it has log-probabilities; and a
frequency-weighted F1 (per component F1 weighted by its firing count, within each site, then
the plain mean over sites). The definitions here follow ``delphi/log/result_analysis.py``
(``compute_confusion``, ``compute_classification_metrics``, ``compute_auc``,
``frequency_weighted_f1``); see docs/evals.md for where we depart (failed examples counted,
fully failed components left out of the weighting, float64 instead of float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class ExampleOutcome:
    """One example as judged: whether it truly is a positive, what the judge said (None: the
    call or its parse failed), and the judge's ``P(1)`` (None: no log-probabilities)."""

    key: str
    activating: bool
    prediction: bool | None
    probability: float | None = None


class Classification(BaseModel):
    """delphi's ``compute_confusion`` + ``compute_classification_metrics`` of some examples.

    ``accuracy`` is delphi's: the *class-balanced* accuracy ``(TPR + TNR) / 2``, a missing class
    contributing 0 (so examples of one class only score at most 0.5). ``raw_accuracy`` is
    ``(TP + TN) / total``. ``failed`` counts examples with no prediction (left out of every
    count, as delphi leaves them out). ``auc`` is null where there are no probabilities or only
    one class among the examples that have one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    true_positives: int
    true_negatives: int
    false_positives: int
    false_negatives: int
    total_examples: int
    total_positives: int
    total_negatives: int
    failed: int
    precision: float
    recall: float
    f1_score: float
    accuracy: float
    raw_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    false_positive_rate: float
    false_negative_rate: float
    auc: float | None
    n_with_probability: int


class ComponentClassification(Classification):
    key: str
    site: str
    firing_count: int


class DelphiMetrics(BaseModel):
    """The pooled (micro) figures over all components, per-component figures, and delphi's
    frequency-weighted F1 (null where no site has a positive total firing count)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pooled: Classification
    weighted_f1: float | None
    components: list[ComponentClassification]


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def classify(outcomes: Sequence[ExampleOutcome]) -> dict[str, Any]:
    """The fields of :class:`Classification` for ``outcomes``."""
    valid = [o for o in outcomes if o.prediction is not None]
    tp = sum(1 for o in valid if o.prediction and o.activating)
    tn = sum(1 for o in valid if not o.prediction and not o.activating)
    fp = sum(1 for o in valid if o.prediction and not o.activating)
    fn = sum(1 for o in valid if not o.prediction and o.activating)
    total = len(valid)
    pos = tp + fn
    neg = tn + fp
    precision = _div(tp, tp + fp)
    recall = _div(tp, pos)
    f1 = _div(2 * precision * recall, precision + recall)
    scored = [(o.activating, o.probability) for o in outcomes if o.probability is not None]
    return {
        "true_positives": tp,
        "true_negatives": tn,
        "false_positives": fp,
        "false_negatives": fn,
        "total_examples": total,
        "total_positives": pos,
        "total_negatives": neg,
        "failed": len(outcomes) - total,
        "precision": precision,
        "recall": recall,
        "f1_score": f1,
        "accuracy": (_div(tp, pos) + _div(tn, neg)) / 2,
        "raw_accuracy": _div(tp + tn, total),
        "true_positive_rate": _div(tp, pos),
        "true_negative_rate": _div(tn, neg),
        "false_positive_rate": _div(fp, neg),
        "false_negative_rate": _div(fn, pos),
        "auc": auroc([a for a, _ in scored], [float(p) for _, p in scored]),
        "n_with_probability": len(scored),
    }


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (= sklearn's ``roc_auc_score``): the Mann-Whitney statistic,
    ties counted one half, from average ranks. None without both classes."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based average rank of the tied block
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def frequency_weighted_f1(
    f1: Mapping[str, float], site: Mapping[str, str], firing_count: Mapping[str, int]
) -> float | None:
    """delphi's ``frequency_weighted_f1``: within each site, the firing-count-weighted mean of
    the components' F1 (a site whose counts sum to 0 is skipped); then the mean over sites."""
    by_site: dict[str, list[str]] = {}
    for key in f1:
        by_site.setdefault(site[key], []).append(key)
    per_site = []
    for keys in by_site.values():
        weight = sum(firing_count[k] for k in keys)
        if weight == 0:
            continue
        per_site.append(sum(f1[k] * firing_count[k] for k in keys) / weight)
    return sum(per_site) / len(per_site) if per_site else None


def delphi_metrics(
    outcomes: Iterable[ExampleOutcome], site: Mapping[str, str], firing_count: Mapping[str, int]
) -> DelphiMetrics:
    """Pooled and per-component figures. A component none of whose examples has a prediction
    is listed but left out of the frequency weighting (delphi would weigh its F1 as 0)."""
    rows = list(outcomes)
    by_key: dict[str, list[ExampleOutcome]] = {}
    for o in rows:
        by_key.setdefault(o.key, []).append(o)
    comps = [
        ComponentClassification(
            key=k, site=site[k], firing_count=int(firing_count[k]), **classify(v)
        )
        for k, v in sorted(by_key.items())
    ]
    f1 = {c.key: c.f1_score for c in comps if c.total_examples > 0}
    return DelphiMetrics(
        pooled=Classification(**classify(rows)),
        weighted_f1=frequency_weighted_f1(f1, site, firing_count),
        components=comps,
    )

"""The loop shared by the scorers that run a local model on the label (embedding, surprisal).

Per component: draw activating windows (one per activation-quantile bin) and windows on
which it does not fire (:mod:`spd_host.evals.llm.windows`), give the label and the windows'
texts to the suite's scorer, which returns one number per window (higher: the label fits
the window better), and score how well that number separates activating from non-activating
windows: AUROC (chance 0.5) and the difference of the two classes' means. A component's
record is appended to ``<suite>.trials.jsonl`` as it is scored; a re-run with the same model
and settings scores only the components not yet scored. Local models cost nothing, so there
is no spend ledger or cost cap here.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from spd_host.adapter import DecompositionAdapter
from spd_host.evals.llm.records import result_header
from spd_host.evals.llm.stats import auroc, mean_or_none
from spd_host.evals.llm.windows import Setup, Window, draw_windows, populations_of, prepare
from spd_host.evals.results import EvalResult

ScoreTexts = Callable[[str, Sequence[str]], list[float]]  # (label, window texts) -> scores


class WindowScore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["top", "quantile", "non-activating"]
    quantile: int
    fires_alone: bool | None = None
    text: str
    score: float


class ComponentRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trial_id: str
    component_key: str
    status: Literal["ok"] = "ok"
    label: str
    auroc: float | None
    difference: float | None  # mean score of activating windows - of non-activating ones
    windows: list[WindowScore]


class LocalScorerResult(EvalResult):
    headline_fields = ("score", "mean_difference")

    suite: Literal["embedding", "surprisal"]
    model: str
    baseline: bool
    chance: float = 0.5
    score: float | None  # mean AUROC over scored components
    mean_difference: float | None
    n_components: int
    n_components_scored: int
    skipped: dict[str, str]
    components: list[ComponentRecord]

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "model": self.model + (" (BASELINE)" if self.baseline else ""),
                "AUROC": self.score,
                "chance": self.chance,
                "mean difference": self.mean_difference,
                "scored": self.n_components_scored,
                "skipped": len(self.skipped),
            }
        ]


def window_text(w: Window, decode: Callable[[list[int]], str]) -> str:
    """The window as text: its tokens' strings joined (as delphi builds ``str_tokens``)."""
    return "".join(decode([t]) for t in w.tokens)


def scorer_setup(adapter: DecompositionAdapter, suite: str, config: Any) -> Setup:
    return prepare(
        adapter,
        suite,
        harvest_run=config.harvest_run,
        label_model=config.label_model,
        max_tokens=config.max_example_tokens,
        n_components=config.n_components,
        seed=config.seed,
        populations=populations_of(config),
    )


def draw_for(setup: Setup, suite: str, key: str, config: Any) -> list[Window] | str:
    """One component's windows (deterministic for a seed and key), or why none."""
    return draw_windows(
        setup.pool,
        key,
        random.Random(f"{config.seed}:{suite}:{key}"),
        n_top=0,
        n_quantile=config.n_activating,
        n_nonactivating=config.n_nonactivating,
        top_examples=[],
    )


def build_windows(
    adapter: DecompositionAdapter, suite: str, config: Any
) -> tuple[dict[str, list[Window]], dict[str, str], Setup]:
    """Every chosen component's windows, the skip reasons, the setup (what a run would score)."""
    setup = scorer_setup(adapter, suite, config)
    out: dict[str, list[Window]] = {}
    skipped: dict[str, str] = {}
    for key in setup.chosen:
        drawn = draw_for(setup, suite, key, config)
        if isinstance(drawn, str):
            skipped[key] = drawn
        else:
            out[key] = drawn
    return out, skipped, setup


def component_record(
    key: str, label: str, windows: list[Window], texts: list[str], scores: list[float]
) -> ComponentRecord:
    pos = [s for w, s in zip(windows, scores, strict=True) if w.activating]
    neg = [s for w, s in zip(windows, scores, strict=True) if not w.activating]
    mp, mn = mean_or_none(pos), mean_or_none(neg)
    return ComponentRecord(
        trial_id=key,
        component_key=key,
        label=label,
        auroc=auroc(pos, neg),
        difference=None if mp is None or mn is None else mp - mn,
        windows=[
            WindowScore(
                kind=w.kind, quantile=w.quantile, fires_alone=w.fires_alone, text=t, score=s
            )
            for w, t, s in zip(windows, texts, scores, strict=True)
        ],
    )


def run_local_scorer(
    suite: Literal["embedding", "surprisal"],
    adapter: DecompositionAdapter,
    config: Any,
    *,
    model_name: str,
    baseline: bool,
    make_scorer: Callable[[], ScoreTexts],
    settings: dict[str, Any],
    notes: list[str],
) -> LocalScorerResult:
    """Score every chosen component with the scorer ``make_scorer()`` builds (only if some
    component is left to score), resuming from the suite's trial log."""
    from spd_host.evals.llm.records import TrialLog
    from spd_host.locking import RunLock
    from spd_host.plugins import get_host

    setup = scorer_setup(adapter, suite, config)
    harvest_run = str(setup.repo.run)
    fields = config.model_dump(
        include={"n_components", "seed", "max_example_tokens", "n_activating", "n_nonactivating", "label_model", "positives", "n_quantiles", "negatives"}
    )  # fmt: skip
    blob = json.dumps([suite, model_name, harvest_run, fields, settings], sort_keys=True)
    run_key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    storage_key = get_host().parse_id(adapter.decomposition_id).storage_key
    log = TrialLog(storage_key, suite, run_key, ComponentRecord)
    skipped: dict[str, str] = {}
    with RunLock(log.lock_path, f"{suite} eval of {adapter.decomposition_id}"):
        # a record is reused only for the label it scored (a relabelled component is redone)
        done = {} if config.force else log.done()
        records = {k: r for k, r in done.items() if r.label == setup.labels.get(k)}
        todo = [k for k in setup.chosen if k not in records]
        if todo:
            score_texts = make_scorer()
            with log.sink() as write:
                # windows are drawn per component as it is scored: a killed run keeps its work
                for key in todo:
                    drawn = draw_for(setup, suite, key, config)
                    if isinstance(drawn, str):
                        skipped[key] = drawn
                        continue
                    label = setup.labels[key]
                    texts = [window_text(w, setup.decode) for w in drawn]
                    rec = component_record(key, label, drawn, texts, score_texts(label, texts))
                    records[key] = rec
                    write(rec)
    comps = [records[k] for k in setup.chosen if k in records]
    all_notes = list(notes)
    if setup.baseline_labels:
        all_notes.append("scored labels include offline BASELINE labels, not an LLM's")
    return LocalScorerResult(
        suite=suite,
        **result_header(adapter, config, harvest_run, all_notes),
        model=model_name,
        baseline=baseline,
        score=mean_or_none([c.auroc for c in comps]),
        mean_difference=mean_or_none([c.difference for c in comps]),
        n_components=len(setup.chosen),
        n_components_scored=sum(c.auroc is not None for c in comps),
        skipped=skipped,
        components=comps,
    )

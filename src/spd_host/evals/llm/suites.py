"""The intruder, detection and fuzzing suites: harvest -> trials -> judge -> result.

Every trial's outcome is appended to ``<evals dir>/<suite>.trials.jsonl`` as it arrives;
a re-run with the same judge, harvest sub-run and trial settings reuses the trials already
judged and retries only the failed and unsent ones. A component's score is the mean over its
successful trials; a component whose trials all failed has no score (it is counted as
failed, never as zero).

Under ``convention="delphi"`` detection and fuzzing are also scored as delphi's result analysis
does (:mod:`spd_host.evals.llm.scoring`): the headline is the class-balanced accuracy of one
confusion matrix pooled over every example of every component, next to F1, precision,
recall, frequency-weighted F1 and AUROC from logprobs (``JudgeResult.delphi``).

Detection and fuzzing records carry, per shown example, where it came from and whether its
window alone reproduces the firing (``populations.ExampleOrigin``); the result reports the
share of positives whose firing is visible and the ``ceiling`` a perfect judge answering from
the windows as shown would reach, aggregated like ``score``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spd_host.adapter import DecompositionAdapter, HarvestOptions
from spd_host.autointerp.ledger import SpendLedger
from spd_host.errors import ConfigError, ResultsNotFoundError
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.firing_check import FiringChecker, exactly
from spd_host.evals.llm.judge import PromptStyle, TrialRecord, judge_trials
from spd_host.evals.llm.populations import (
    ExampleOrigin,
    PopulationOptions,
    SequenceSource,
    Visible,
    trial_ceiling,
)
from spd_host.evals.llm.records import open_ledger_at
from spd_host.evals.llm.requests import held_in_batches, held_note, scope_of
from spd_host.evals.llm.scoring import DelphiMetrics, ExampleOutcome, delphi_metrics
from spd_host.evals.llm.trials import (
    Kind,
    Pool,
    Trial,
    detection_trial,
    fuzzing_trial,
    intruder_trial,
    rebatch,
)
from spd_host.evals.results import EvalResult, evals_dir, package_version
from spd_host.locking import RunLock


class ComponentScore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    score: float | None
    n_ok: int
    n_failed: int


class SuiteTrialRecord(TrialRecord):
    """A judged trial and, per shown example, its origin (empty for intruder trials)."""

    examples: list[ExampleOrigin] = Field(default_factory=list)


class JudgeResult(EvalResult):
    suite: Literal["intruder", "detection", "fuzzing"]
    judge: str
    baseline: bool
    chance: float
    score: float | None
    n_components: int
    n_components_scored: int
    n_trials_ok: int
    n_trials_failed: int
    n_trials_not_sent: int
    n_trials_in_open_batches: int = 0
    """Of the trials not sent, those an open batch holds (collect: --batch; cancel:
    --cancel-batches)."""
    skipped: dict[str, str]
    spent_usd: float
    stopped_by_cost_cap: bool
    components: list[ComponentScore]
    positives_visible: float | None = None
    """Share of shown positives whose firing the window alone shows (detection: anywhere in
    the window; fuzzing: at the recorded firing token)."""
    ceiling: float | None = None
    """The score a perfect judge answering from the windows as shown would reach."""
    trials: list[SuiteTrialRecord]
    convention: str = "spd-host"
    delphi: DelphiMetrics | None = None  # under convention="delphi"

    def table_rows(self) -> list[dict[str, Any]]:
        extra: dict[str, Any] = {}
        if self.delphi is not None:
            p = self.delphi.pooled
            extra = {"F1": p.f1_score, "weighted F1": self.delphi.weighted_f1, "AUROC": p.auc}
        return [
            {
                "judge": self.judge + (" (BASELINE)" if self.baseline else ""),
                "convention": self.convention,
                "score": self.score,
                **extra,
                "chance": self.chance,
                "ceiling": self.ceiling,
                "scored": self.n_components_scored,
                "failed trials": self.n_trials_failed,
                "not sent": self.n_trials_not_sent,
                "USD": self.spent_usd,
            }
        ]


def _chance(kind: Kind, config: JudgeSuiteConfig) -> float:
    return 1.0 / (config.n_real + 1) if kind == "intruder" else 0.5


def _open_harvest(adapter: DecompositionAdapter, run: str | None) -> Any:
    try:
        from spd_host.harvest import HarvestRepo
    except ImportError as err:  # pragma: no cover - the harvest ships with the host
        raise ConfigError("spd_host.harvest is not available") from err
    try:
        return HarvestRepo.open(adapter.decomposition_id, run=run)
    except ResultsNotFoundError as err:
        raise ResultsNotFoundError(
            f"the LLM eval suites need a harvest of {adapter.decomposition_id!r}: {err.message}",
            hint=f"run `spd-host harvest {adapter.decomposition_id}` first",
        ) from None


def _labels(decomposition_id: str, model: str | None) -> tuple[dict[str, str], bool]:
    """The newest ok label per component, and whether any is an offline baseline label."""
    from spd_host.autointerp.api import load_labels

    try:
        records = load_labels(decomposition_id, model=model)
    except ResultsNotFoundError:
        return {}, False
    out: dict[str, str] = {}
    baseline = False
    for r in sorted(records, key=lambda r: r.finished_at):
        if r.label and r.label.strip():  # a blank label says nothing to judge
            out[r.component_key] = r.label
            baseline = baseline or r.is_baseline
    return out, baseline


def _firing_checker(
    adapter: DecompositionAdapter, threshold: float, batch_size: int = 32
) -> FiringChecker:
    """The window-alone firing check of the trial builders (batched, cached: ``firing_check``)."""
    from spd_host.plugins import get_host

    model = adapter.load_base_model()
    device = next(model.parameters()).device
    fn = get_host().harvest_fn(
        adapter, HarvestOptions(threshold=threshold, device=str(device), next_token=False)
    )
    return FiringChecker(
        fn,
        device,
        batch_size=batch_size,
        batch_dependent=bool(adapter.defaults.extra.get("batch_dependent", False)),
    )


def _sequence_source(adapter: DecompositionAdapter, repo: Any, batches: Any) -> Any:
    """The harvest's token stream by position, or None when it is not on record."""
    cfg = repo.config
    if batches is None:
        if "tokenization" not in repo.meta:  # tokens were passed in, not read by spd_host.data
            return None
        from spd_host.harvest.runner import dataset_batches, resolve_config

        cfg = resolve_config(adapter, cfg)
        batches = dataset_batches(adapter, cfg)
    return SequenceSource(batches, cfg.batch_size, int(cfg.seq_len or 128))


def _decoder(tokenizer: Any) -> Any:
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        return lambda ids: tokenizer.decode(ids)
    return lambda ids: "".join(f" t{i}" for i in ids)


def trials_path(storage_key: str, suite: str) -> Path:
    return evals_dir(storage_key) / f"{suite}.trials.jsonl"


def _run_key(suite: str, judge: str, harvest_run: str, config: JudgeSuiteConfig) -> str:
    trial_fields = config.model_dump(
        include={
            "n_components", "n_trials", "seed", "max_example_tokens", "density_tolerance",
            "n_real", "n_positive", "n_negative", "n_fuzz_examples", "label_model",
            "positives", "n_quantiles", "negatives", "window", "max_widen_tokens",
        }
    )  # fmt: skip
    parts: list[Any] = [suite, judge, harvest_run, trial_fields]
    style = config.judge_style()
    if style != JudgeSuiteConfig().judge_style() or config.convention != "spd-host":
        # keys of runs in today's defaults stay what they were (their resume keeps working)
        parts.append([config.convention, style, config.top_logprobs, config.mark_fraction])
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_pool(
    adapter: DecompositionAdapter, config: Any, repo: Any = None, *, batches: Any = None
) -> Pool:
    """The example pool of a harvest, with the firing check and the population options of
    ``config`` (a ``JudgeSuiteConfig``, or any config with its population fields); what a
    scorer needs to call ``pool.positives(key, n, rng)`` / ``pool.negatives(key, n, rng)``.

    ``repo``: an open ``HarvestRepo`` (default: ``config.harvest_run`` of the decomposition).
    """
    if repo is None:
        repo = _open_harvest(adapter, getattr(config, "harvest_run", None))
    summary = repo.summary()

    def load_examples(key: str) -> list[Any]:
        d = repo.component(key)
        return [*d.top_examples, *d.reservoir_examples]

    window = getattr(config, "window", "as_recorded")
    return Pool(
        density={c.key: c.density for c in summary},
        site={c.key: c.site for c in summary},
        fires=_firing_checker(
            adapter,
            float(getattr(repo.config, "threshold", 0.0)),
            int(getattr(repo.config, "batch_size", 32) or 32),
        ),
        act_type=adapter.activation_types[0],
        load_examples=load_examples,
        max_tokens=getattr(config, "max_example_tokens", 64),
        populations=PopulationOptions(
            **{f: getattr(config, f) for f in PopulationOptions.model_fields if hasattr(config, f)}
        ),
        sequence=_sequence_source(adapter, repo, batches) if window == "widen" else None,
    )


def _draw_trials_exactly(
    kind: Kind,
    pool: Pool,
    chosen: list[str],
    config: JudgeSuiteConfig,
    labels: dict[str, str],
    style: dict[str, Any],
    skipped: dict[str, str],
) -> list[Trial]:
    """:func:`_draw_trials` with the firing checks of all components batched
    (``firing_check.exactly``: speculative passes until one asks about no new window)."""

    def build() -> tuple[list[Trial], dict[str, str]]:
        skips: dict[str, str] = {}
        return _draw_trials(kind, pool, chosen, config, labels, style, skips), skips

    trials, skips = exactly(pool.fires, build)
    skipped.update(skips)
    return trials


def _draw_trials(
    kind: Kind,
    pool: Pool,
    chosen: list[str],
    config: JudgeSuiteConfig,
    labels: dict[str, str],
    style: dict[str, Any],
    skipped: dict[str, str],
) -> list[Trial]:
    """Every chosen component's trials, each from its own seeded stream (skips into ``skipped``)."""
    trials: list[Trial] = []
    for key in chosen:
        krng = random.Random(f"{config.seed}:{kind}:{key}")
        for i in range(config.n_trials):
            t: Trial | str
            if kind == "intruder":
                t = intruder_trial(
                    pool, key, i, krng, n_real=config.n_real, tolerance=config.density_tolerance
                )
            elif kind == "detection":
                t = detection_trial(
                    pool,
                    key,
                    i,
                    krng,
                    n_pos=config.n_positive,
                    n_neg=config.n_negative,
                    label=labels[key],
                )
            else:
                t = fuzzing_trial(
                    pool,
                    key,
                    i,
                    krng,
                    n_examples=config.n_fuzz_examples,
                    label=labels[key],
                    fuzz_type=style["fuzz_type"],
                    mark_rule=style["mark_rule"],
                    mark_fraction=config.mark_fraction,
                )
            if isinstance(t, str):
                skipped[key] = t
                break
            trials.append(t)
    return trials


def build_trials(
    kind: Kind, adapter: DecompositionAdapter, config: JudgeSuiteConfig, *, batches: Any = None
) -> tuple[list[Trial], dict[str, str], Any]:
    """The trials a run would judge (deterministic for a seed), the skip reasons, the harvest.

    ``batches``: the harvest's token source (as ``run_harvest`` took it), for
    ``window="widen"``; by default the harvest's own ``spd_host.data`` stream when it recorded
    one.
    """
    style = _style_for(kind, config)
    repo = _open_harvest(adapter, config.harvest_run)
    labels: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if kind != "intruder":
        labels, _ = _labels(adapter.decomposition_id, config.label_model)
        if not labels:
            raise ResultsNotFoundError(
                f"the {kind} suite scores labels, and {adapter.decomposition_id!r} has none",
                hint=f"run `spd-host autointerp {adapter.decomposition_id}` first",
            )

    pool = build_pool(adapter, config, repo, batches=batches)
    eligible = sorted(
        k for k, d in pool.density.items() if d > 0 and (kind == "intruder" or k in labels)
    )
    rng = random.Random(config.seed)
    rng.shuffle(eligible)
    chosen = eligible[: config.n_components] if config.n_components else eligible
    trials = _draw_trials_exactly(kind, pool, sorted(chosen), config, labels, style, skipped)
    if kind != "intruder" and style["n_examples_shown"]:
        trials = rebatch(trials, style["n_examples_shown"], f"{config.seed}:{kind}")
    return trials, skipped, repo


def _style_for(kind: Kind, config: JudgeSuiteConfig) -> dict[str, Any]:
    style = config.judge_style()
    if kind == "intruder" and style != JudgeSuiteConfig().judge_style():
        raise ConfigError(
            "the intruder suite has one question and one score; --convention, --prompt-form, "
            "--n-examples-shown, --fuzz-type and --mark-rule apply to detection and fuzzing",
            hint="drop those options for intruder",
        )
    return style


def run_judge_suite(
    kind: Kind, adapter: DecompositionAdapter, config: JudgeSuiteConfig
) -> JudgeResult:
    from spd_host.autointerp.registry import get_provider
    from spd_host.plugins import get_host

    llm = config.llm()
    provider = get_provider(llm.provider)
    judge_name = f"{provider.name}/{'baseline-judge' if provider.baseline else (llm.model or provider.default_model)}"
    trials, skipped, repo = build_trials(kind, adapter, config)
    harvest_run = str(repo.run)
    storage_key = get_host().parse_id(adapter.decomposition_id).storage_key
    path = trials_path(storage_key, kind)
    run_key = _run_key(kind, judge_name, harvest_run, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(
        path.with_name(path.name + ".lock"), f"{kind} eval of {adapter.decomposition_id}"
    )
    with lock, open_ledger_at(path.with_name(f"{kind}.spend.db")) as ledger:
        done = {} if config.force else _done_trials(path, run_key)
        todo = [t for t in trials if t.trial_id not in done]
        records = dict(done)
        with path.open("a") as sink:
            spent, capped, baseline, judge = _judge_into(
                sink, records, run_key, todo, llm, adapter, repo, ledger, _prompt_style(config)
            )
        held = held_in_batches(
            ledger,
            scope_of("judge", llm, run_key),
            [t.trial_id for t in todo if t.trial_id not in records],
        )
    result = _result(
        kind, adapter, config, trials, records, skipped, harvest_run, spent, capped, baseline, judge,
        held,
    )  # fmt: skip
    if config.convention != "delphi" or kind == "intruder":
        return result
    return _with_delphi(result, config, {c.key: c for c in repo.summary()})


def _prompt_style(config: JudgeSuiteConfig) -> PromptStyle:
    style = config.judge_style()
    binary = style["prompt_form"] == "binary"
    return PromptStyle(
        form=style["prompt_form"],
        top_logprobs=config.top_logprobs if binary and style["logprobs"] else None,
    )


def _outcomes(records: Sequence[TrialRecord]) -> list[ExampleOutcome]:
    """Every example of every judged trial (a failed trial's examples have no prediction)."""
    out = []
    for r in records:
        if r.n_items is None:
            raise ConfigError(
                f"trial {r.trial_id} was stored without its example count (an older run)",
                hint="re-run with --force to score it under the delphi convention",
            )
        ok = r.status == "ok" and r.predicted is not None
        predicted = set(r.predicted or [])
        for i in range(1, r.n_items + 1):
            prob = r.probabilities[i - 1] if ok and r.probabilities else None
            out.append(
                ExampleOutcome(
                    r.component_key, i in r.truth, (i in predicted) if ok else None, prob
                )
            )
    return out


def _with_delphi(
    result: JudgeResult, config: JudgeSuiteConfig, summary: dict[str, Any]
) -> JudgeResult:
    """The result with delphi's pooled figures, its headline their class-balanced accuracy."""
    metrics = delphi_metrics(
        _outcomes(result.trials),
        {k: c.site for k, c in summary.items()},
        {k: int(c.firing_count) for k, c in summary.items()},
    )
    style = config.judge_style()
    ok = [r for r in result.trials if r.status == "ok"]
    with_p = sum(1 for r in ok if r.probabilities is not None)
    notes = list(result.notes)
    if style["prompt_form"] != "binary":
        notes.append("AUROC not computed: it needs one 0/1 per example (--prompt-form binary)")
    elif not style["logprobs"]:
        notes.append("AUROC not computed: logprobs were not requested (--logprobs)")
    elif ok and with_p == 0:
        notes.append("AUROC not computed: the judge returned no usable logprobs")
    elif with_p < len(ok):
        notes.append(f"AUROC over the {with_p} of {len(ok)} judged prompts that had logprobs")
    pooled = metrics.pooled
    return result.model_copy(
        update={
            "convention": "delphi",
            "delphi": metrics,
            "notes": notes,
            "score": pooled.accuracy if pooled.total_examples else None,
        }
    )


def _done_trials(path: Path, run_key: str) -> dict[str, SuiteTrialRecord]:
    """Trials of this run key already judged ok (a line cut short by a kill is skipped)."""
    done: dict[str, SuiteTrialRecord] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("run_key") == run_key:
            rec = SuiteTrialRecord.model_validate(row["record"])
            if rec.status == "ok" or rec.trial_id not in done:
                done[rec.trial_id] = rec
    return {k: v for k, v in done.items() if v.status == "ok"}


def _judge_into(
    sink: Any,
    records: dict[str, SuiteTrialRecord],
    run_key: str,
    todo: list[Trial],
    llm: Any,
    adapter: DecompositionAdapter,
    repo: Any,
    ledger: SpendLedger,
    style: PromptStyle | None = None,
) -> tuple[float, bool, bool, str]:
    from spd_host.autointerp.evidence import ComponentEvidence

    origins = {t.trial_id: t.extras.get("examples", []) for t in todo}

    def on_record(plain: TrialRecord) -> None:
        rec = SuiteTrialRecord(**plain.model_dump(), examples=origins.get(plain.trial_id, []))
        records[rec.trial_id] = rec
        sink.write(json.dumps({"run_key": run_key, "record": rec.model_dump(mode="json")}) + "\n")
        sink.flush()

    sites = {s.name: s for s in adapter.sites}
    summary = {c.key: c for c in repo.summary()}

    def evidence_for(key: str) -> ComponentEvidence:
        s = sites[summary[key].site]
        return ComponentEvidence(
            component_key=key,
            site=s.name,
            location=s.reads_from,
            method_name=adapter.method.name,
            method_description=adapter.method.description,
            firing_density=min(1.0, summary[key].density),
            firing_count=summary[key].firing_count,
        )

    def top_tokens(key: str) -> set[int]:
        return {s.token for s in repo.token_stats(key, "input", top=10).top_pmi}

    tokenizer = repo.tokenizer if hasattr(repo, "tokenizer") else None
    return judge_trials(
        todo,
        llm,
        decode=_decoder(tokenizer),
        evidence_for=evidence_for,
        top_tokens=top_tokens,
        on_record=on_record,
        ledger=ledger,
        style=style,
        batch_scope=run_key,
    )


def _ceiling(
    kind: Kind, trials: list[Trial], scored: set[str]
) -> tuple[float | None, float | None]:
    """Share of shown positives whose firing is visible, and the perfect-judge score,
    aggregated like ``score`` (trial -> component mean -> mean over scored components)."""
    if kind == "intruder":
        return None, None
    visible: Visible = "any" if kind == "detection" else "centre"
    per_key: dict[str, list[float]] = {}
    seen: list[bool] = []
    for t in trials:
        if t.key not in scored:
            continue
        origins = t.extras.get("examples", [])
        c = trial_ceiling(origins, visible)
        if c is not None:
            per_key.setdefault(t.key, []).append(c)
        seen += [
            bool(o.fires_alone if visible == "any" else o.centre_fires_alone)
            for o in origins
            if o.role == "positive"
        ]
    if not per_key:
        return None, None
    means = [sum(v) / len(v) for v in per_key.values()]
    return sum(seen) / len(seen), sum(means) / len(means)


def _result(
    kind: Kind,
    adapter: DecompositionAdapter,
    config: JudgeSuiteConfig,
    trials: list[Trial],
    records: dict[str, SuiteTrialRecord],
    skipped: dict[str, str],
    harvest_run: str,
    spent: float,
    capped: bool,
    baseline: bool,
    judge: str,
    held: tuple[int, list[str]] = (0, []),
) -> JudgeResult:
    final = [records[t.trial_id] for t in trials if t.trial_id in records]
    not_sent = sum(1 for t in trials if t.trial_id not in records)
    by_key: dict[str, list[TrialRecord]] = {}
    for r in final:
        by_key.setdefault(r.component_key, []).append(r)
    comps = []
    for key, recs in sorted(by_key.items()):
        ok = [r.score for r in recs if r.status == "ok" and r.score is not None]
        comps.append(
            ComponentScore(
                key=key,
                score=sum(ok) / len(ok) if ok else None,
                n_ok=len(ok),
                n_failed=sum(r.status == "failed" for r in recs),
            )
        )
    scored = [c.score for c in comps if c.score is not None]
    visible_share, ceiling = _ceiling(kind, trials, {c.key for c in comps if c.score is not None})
    notes = []
    if baseline:
        notes.append("offline BASELINE judge (token overlap / top tokens), not an LLM")
    if capped:
        notes.append("stopped by the cost cap: some trials were not sent")
    if held[0]:
        notes.append(held_note(*held))
    if kind != "intruder" and _labels(adapter.decomposition_id, config.label_model)[1]:
        notes.append("scored labels include offline BASELINE labels, not an LLM's")
    return JudgeResult(
        suite=kind,
        decomposition_id=adapter.decomposition_id,
        method=adapter.method.name,
        package_version=package_version(),
        config=config.model_dump(mode="json"),
        harvest_run=harvest_run,
        notes=notes,
        judge=judge,
        baseline=baseline,
        chance=_chance(kind, config),
        score=sum(scored) / len(scored) if scored else None,
        n_components=len({t.key for t in trials}) + len(skipped),
        n_components_scored=len(scored),
        n_trials_ok=sum(r.status == "ok" for r in final),
        n_trials_failed=sum(r.status == "failed" for r in final),
        n_trials_not_sent=not_sent,
        n_trials_in_open_batches=held[0],
        skipped=skipped,
        spent_usd=spent,
        stopped_by_cost_cap=capped,
        components=comps,
        positives_visible=visible_share,
        ceiling=ceiling,
        trials=final,
    )

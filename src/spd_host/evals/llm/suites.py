"""The intruder, detection and fuzzing suites: harvest -> trials -> judge -> result.

Every trial's outcome is appended to ``<evals dir>/<suite>.trials.jsonl`` as it arrives;
a re-run with the same judge, harvest sub-run and trial settings reuses the trials already
judged and retries only the failed and unsent ones. A component's score is the mean over its
successful trials; a component whose trials all failed has no score (it is counted as
failed, never as zero).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from spd_host.adapter import DecompositionAdapter, HarvestOptions, parse_component_key
from spd_host.autointerp.ledger import SpendLedger, open_ledger
from spd_host.errors import ConfigError, ResultsNotFoundError
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.judge import TrialRecord, judge_trials
from spd_host.evals.llm.trials import (
    Kind,
    Pool,
    Trial,
    detection_trial,
    fuzzing_trial,
    intruder_trial,
)
from spd_host.evals.results import EvalResult, evals_dir, package_version
from spd_host.locking import RunLock


class ComponentScore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    score: float | None
    n_ok: int
    n_failed: int


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
    skipped: dict[str, str]
    spent_usd: float
    stopped_by_cost_cap: bool
    components: list[ComponentScore]
    trials: list[TrialRecord]

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "judge": self.judge + (" (BASELINE)" if self.baseline else ""),
                "score": self.score,
                "chance": self.chance,
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
        if r.label:
            out[r.component_key] = r.label
            baseline = baseline or r.is_baseline
    return out, baseline


def _firing_checker(adapter: DecompositionAdapter, threshold: float) -> Any:
    from spd_host.plugins import get_host

    model = adapter.load_base_model()
    device = next(model.parameters()).device
    fn = get_host().harvest_fn(
        adapter, HarvestOptions(threshold=threshold, device=str(device), next_token=False)
    )
    cache: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def fires(key: str, tokens: Any) -> list[bool]:
        t = tuple(int(x) for x in tokens)
        if t not in cache:
            with torch.no_grad():
                batch = fn(torch.tensor([t], dtype=torch.long, device=device))
            cache[t] = {s: f[0].cpu() for s, f in batch.firings.items()}
        site, idx = parse_component_key(key)
        return [bool(x) for x in cache[t][site][:, idx]]

    return fires


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
        }
    )  # fmt: skip
    blob = json.dumps([suite, judge, harvest_run, trial_fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_trials(
    kind: Kind, adapter: DecompositionAdapter, config: JudgeSuiteConfig
) -> tuple[list[Trial], dict[str, str], Any]:
    """The trials a run would judge (deterministic for a seed), the skip reasons, the harvest."""
    repo = _open_harvest(adapter, config.harvest_run)
    summary = repo.summary()
    density = {c.key: c.density for c in summary}
    site = {c.key: c.site for c in summary}
    labels: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if kind != "intruder":
        labels, _ = _labels(adapter.decomposition_id, config.label_model)
        if not labels:
            raise ResultsNotFoundError(
                f"the {kind} suite scores labels, and {adapter.decomposition_id!r} has none",
                hint=f"run `spd-host autointerp {adapter.decomposition_id}` first",
            )

    def load_examples(key: str) -> list[Any]:
        d = repo.component(key)
        return [*d.top_examples, *d.reservoir_examples]

    pool = Pool(
        density=density,
        site=site,
        fires=_firing_checker(adapter, float(getattr(repo.config, "threshold", 0.0))),
        act_type=adapter.activation_types[0],
        load_examples=load_examples,
        max_tokens=config.max_example_tokens,
    )
    eligible = sorted(
        k for k, d in density.items() if d > 0 and (kind == "intruder" or k in labels)
    )
    rng = random.Random(config.seed)
    rng.shuffle(eligible)
    chosen = eligible[: config.n_components] if config.n_components else eligible
    trials: list[Trial] = []
    for key in sorted(chosen):
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
                    pool, key, i, krng, n_examples=config.n_fuzz_examples, label=labels[key]
                )
            if isinstance(t, str):
                skipped[key] = t
                break
            trials.append(t)
    return trials, skipped, repo


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
    with lock, _ledger(path.with_name(f"{kind}.spend.db")) as ledger:
        done = {} if config.force else _done_trials(path, run_key)
        todo = [t for t in trials if t.trial_id not in done]
        records = dict(done)
        with path.open("a") as sink:
            spent, capped, baseline, judge = _judge_into(
                sink, records, run_key, todo, llm, adapter, repo, ledger
            )
    return _result(
        kind, adapter, config, trials, records, skipped, harvest_run, spent, capped, baseline, judge
    )


@contextlib.contextmanager
def _ledger(path: Path) -> Iterator[SpendLedger]:
    conn, ledger = open_ledger(str(path))
    try:
        yield ledger
    finally:
        conn.close()


def _done_trials(path: Path, run_key: str) -> dict[str, TrialRecord]:
    """Trials of this run key already judged ok (a line cut short by a kill is skipped)."""
    done: dict[str, TrialRecord] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("run_key") == run_key:
            rec = TrialRecord.model_validate(row["record"])
            if rec.status == "ok" or rec.trial_id not in done:
                done[rec.trial_id] = rec
    return {k: v for k, v in done.items() if v.status == "ok"}


def _judge_into(
    sink: Any,
    records: dict[str, TrialRecord],
    run_key: str,
    todo: list[Trial],
    llm: Any,
    adapter: DecompositionAdapter,
    repo: Any,
    ledger: SpendLedger,
) -> tuple[float, bool, bool, str]:
    from spd_host.autointerp.evidence import ComponentEvidence

    def on_record(rec: TrialRecord) -> None:
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
        batch_scope=run_key,
    )


def _result(
    kind: Kind,
    adapter: DecompositionAdapter,
    config: JudgeSuiteConfig,
    trials: list[Trial],
    records: dict[str, TrialRecord],
    skipped: dict[str, str],
    harvest_run: str,
    spent: float,
    capped: bool,
    baseline: bool,
    judge: str,
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
    notes = []
    if baseline:
        notes.append("offline BASELINE judge (token overlap / top tokens), not an LLM")
    if capped:
        notes.append("stopped by the cost cap: some trials were not sent")
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
        skipped=skipped,
        spent_usd=spent,
        stopped_by_cost_cap=capped,
        components=comps,
        trials=final,
    )

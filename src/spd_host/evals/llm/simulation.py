"""The simulation suite (OpenAI's neuron simulator, as delphi runs it): from the label alone,
the judge predicts the component's activation, 0-10, on every token of a set of windows; the
score is the Pearson correlation of predicted with true activations.

- Truth: each window's activations on delphi's 0-10 scale (``ceil(10 a / max)``, ``max`` the
  component's largest recorded activation); non-activating windows are all 0.
- One trial is one request showing every window of the trial; the judge answers all windows
  at once as JSON. ``mode="logprobs"`` reads, at each number it wrote, the expected value
  over 0-10 from that token's ``top_logprobs`` (OpenAI-compatible providers).
- Scores per component: ``correlation`` pools every token of every window of its trials
  (delphi's headline ``ev_correlation_score`` at distance 0, OpenAI's "all at once" score);
  ``correlation_activating`` pools the activating windows only; ``mean_window_correlation`` is
  the mean of the per-window correlations where defined (delphi's per-sequence scores; a
  non-activating window has a constant truth, hence none). A correlation with a constant
  series is undefined: the component has no score (never a zero).
- Trials are appended to ``simulation.trials.jsonl`` as they are judged; a re-run with the
  same settings sends only the failed and unsent ones, under the suite's spend ledger and cap.
- The ``offline`` provider is a BASELINE judge, no LLM: it predicts 10 on the component's ten
  top-PMI input tokens and 0 elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from spd_host.adapter import DecompositionAdapter
from spd_host.autointerp.answer import MalformedAnswerError
from spd_host.autointerp.calls import Outcome
from spd_host.autointerp.evidence import ComponentEvidence
from spd_host.autointerp.providers.base import Completion, CompletionRequest
from spd_host.errors import ConfigError
from spd_host.evals.llm.logprobs import values_at
from spd_host.evals.llm.records import result_header
from spd_host.evals.llm.scorer_configs import SimulationConfig
from spd_host.evals.llm.stats import mean_or_none, pearson
from spd_host.evals.llm.windows import (
    MAX_LEVEL,
    Setup,
    Window,
    draw_windows,
    levels,
    populations_of,
    prepare,
)
from spd_host.evals.results import EvalResult
from spd_host.locking import RunLock

SUITE: Literal["simulation"] = "simulation"
LOGPROB_PROVIDERS = ("openai", "openrouter", "openai-compatible")

SYSTEM = (
    "You are simulating a component of a neural network in an interpretability experiment. "
    "From a description of what the component responds to, you predict how strongly it "
    "activates on each token of some text excerpts: an integer from 0 (not at all) to 10 (its "
    "strongest activation). Most activations are 0. Answer only with the JSON object asked for."
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "windows": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "window": {"type": "integer", "description": "the window's number"},
                    "activations": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "one integer 0-10 per token of the window, in order",
                    },
                },
                "required": ["window", "activations"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["windows"],
    "additionalProperties": False,
}


@dataclass
class SimTrial:
    trial_id: str
    key: str
    label: str
    windows: list[Window]
    truth: list[list[int]]


class WindowRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["top", "quantile", "non-activating"]
    quantile: int
    fires_alone: bool | None = None  # the component fires somewhere in the window run alone
    truth: list[int]
    predicted: list[float] | None = None
    correlation: float | None = None


class SimulationRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trial_id: str
    component_key: str
    label: str
    status: Literal["ok", "failed"]
    windows: list[WindowRecord]
    error: str | None = None
    cost_usd: float = 0.0
    attempts: int = 0
    n_values_from_text: int = 0  # logprobs mode: numbers whose expected value could not be read


class SimComponentScore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    correlation: float | None
    correlation_activating: float | None
    mean_window_correlation: float | None
    n_windows: int
    n_ok: int
    n_failed: int


class SimulationResult(EvalResult):
    headline_fields = ("score", "score_activating", "score_window_mean")

    suite: Literal["simulation"]
    judge: str
    baseline: bool
    mode: Literal["json", "logprobs"]
    chance: float = 0.0
    score: float | None
    score_activating: float | None
    score_window_mean: float | None
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
    components: list[SimComponentScore]
    trials: list[SimulationRecord]

    def table_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "judge": self.judge + (" (BASELINE)" if self.baseline else ""),
                "mode": self.mode,
                "correlation": self.score,
                "activating only": self.score_activating,
                "window mean": self.score_window_mean,
                "scored": self.n_components_scored,
                "failed trials": self.n_trials_failed,
                "not sent": self.n_trials_not_sent,
                "USD": self.spent_usd,
            }
        ]


# -- trials -----------------------------------------------------------------------------------


def build_trials(
    adapter: DecompositionAdapter, config: SimulationConfig
) -> tuple[list[SimTrial], dict[str, str], Setup]:
    """The trials a run would judge (deterministic for a seed), skip reasons, the setup."""
    setup = prepare(
        adapter,
        SUITE,
        harvest_run=config.harvest_run,
        label_model=config.label_model,
        max_tokens=config.max_example_tokens,
        n_components=config.n_components,
        seed=config.seed,
        populations=populations_of(config),
    )
    trials: list[SimTrial] = []
    skipped: dict[str, str] = {}
    for key in setup.chosen:
        rng = random.Random(f"{config.seed}:{SUITE}:{key}")
        top = setup.max_activation(key)
        for i in range(config.n_trials):
            windows = draw_windows(
                setup.pool,
                key,
                rng,
                n_top=config.n_top,
                n_quantile=config.n_quantile,
                n_nonactivating=config.n_nonactivating,
                top_examples=setup.top_examples(key),
            )
            if isinstance(windows, str):
                skipped[key] = windows
                break
            truth = [levels(w.activations, top) for w in windows]
            trials.append(SimTrial(f"{SUITE}:{key}:{i}", key, setup.labels[key], windows, truth))
    return trials, skipped, setup


def prompt_for(trial: SimTrial, decode: Any) -> str:
    lines = [
        f"Trial {trial.trial_id}",
        f'The component has been described as: "{trial.label}".',
        f"Predict its activation (an integer 0-{MAX_LEVEL}) on every token of each window "
        'below. Answer {"windows": [{"window": <number>, "activations": [<one integer per '
        "token>]}, ...]}, one entry per window, in order, each with exactly as many integers "
        "as the window has tokens.",
        "",
    ]
    for i, w in enumerate(trial.windows, 1):
        toks = [decode([t]) for t in w.tokens]
        lines.append(f"Window {i} ({len(toks)} tokens): {json.dumps(toks, ensure_ascii=False)}")
    return "\n".join(lines)


# -- answers ----------------------------------------------------------------------------------


def parse_windows(data: dict[str, Any], lengths: list[int]) -> list[list[int]]:
    """The integers of each window, in window order; malformed if any window is missing,
    repeated, of the wrong length, or has a value outside 0-10."""
    items = data.get("windows")
    if not isinstance(items, list):
        raise MalformedAnswerError("the answer has no 'windows' list")
    by_number: dict[int, list[int]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("window"), int):
            raise MalformedAnswerError(f"a window entry has no window number: {str(item)[:80]!r}")
        n = int(item["window"])
        if n in by_number or not 1 <= n <= len(lengths):
            raise MalformedAnswerError(f"window {n} is repeated or not one of 1-{len(lengths)}")
        values = item.get("activations")
        if not isinstance(values, list) or len(values) != lengths[n - 1]:
            got = len(values) if isinstance(values, list) else "no list"
            raise MalformedAnswerError(
                f"window {n} has {lengths[n - 1]} tokens, the answer gave {got} activations"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise MalformedAnswerError(f"window {n}: activations must be integers")
        if any(not 0 <= v <= MAX_LEVEL for v in values):
            raise MalformedAnswerError(f"window {n}: an activation is outside 0-{MAX_LEVEL}")
        by_number[n] = list(values)
    if len(by_number) != len(lengths):
        missing = sorted(set(range(1, len(lengths) + 1)) - set(by_number))
        raise MalformedAnswerError(f"the answer has no activations for window(s) {missing}")
    return [by_number[i] for i in range(1, len(lengths) + 1)]


_ARRAY = re.compile(r'"activations"\s*:\s*\[([^\]]*)\]')
_INT = re.compile(r"\d+")


def number_spans(content: str) -> list[list[tuple[int, int]]]:
    """Character ranges of the numbers of each ``"activations"`` array, in text order."""
    out = []
    for m in _ARRAY.finditer(content):
        base = m.start(1)
        out.append([(base + n.start(), base + n.end()) for n in _INT.finditer(m.group(1))])
    return out


def expected_windows(
    completion: Completion, data: dict[str, Any], written: list[list[int]]
) -> tuple[list[list[float]], int]:
    """logprobs mode: each window's expected values; numbers that cannot be read from the
    logprobs keep the written integer (their count is returned)."""
    if completion.logprobs is None or completion.content is None:
        raise MalformedAnswerError(
            "logprobs mode: the provider returned no logprobs",
            hint="use an OpenAI-compatible provider that returns top_logprobs, or --mode json",
        )
    spans = number_spans(completion.content)
    order = [int(item["window"]) for item in data["windows"]]
    if len(spans) != len(order) or any(
        len(s) != len(written[n - 1]) for s, n in zip(spans, order, strict=True)
    ):
        raise MalformedAnswerError("logprobs mode: the answer text does not match its JSON")
    out: list[list[float]] = [[] for _ in written]
    fallback = 0
    for s, n in zip(spans, order, strict=True):
        evs = values_at(completion.logprobs, completion.content, s, 0, MAX_LEVEL)
        row = []
        for ev, w in zip(evs, written[n - 1], strict=True):
            if ev is None:
                fallback += 1
                row.append(float(w))
            else:
                row.append(ev)
        out[n - 1] = row
    return out, fallback


def baseline_prediction(trial: SimTrial, top_tokens: set[int]) -> list[list[float]]:
    """The offline BASELINE judge: 10 on the component's top-PMI input tokens, else 0."""
    return [[float(MAX_LEVEL) if t in top_tokens else 0.0 for t in w.tokens] for w in trial.windows]


def _record(
    trial: SimTrial, predicted: list[list[float]], out: Outcome | None, fallback: int = 0
) -> SimulationRecord:
    rows = [
        WindowRecord(
            kind=w.kind,
            quantile=w.quantile,
            fires_alone=w.fires_alone,
            truth=truth,
            predicted=pred,
            correlation=pearson([float(x) for x in truth], pred),
        )
        for w, truth, pred in zip(trial.windows, trial.truth, predicted, strict=True)
    ]
    return SimulationRecord(
        trial_id=trial.trial_id,
        component_key=trial.key,
        label=trial.label,
        status="ok",
        windows=rows,
        cost_usd=out.cost if out else 0.0,
        attempts=out.attempts if out else 0,
        n_values_from_text=fallback,
    )


# -- scores -----------------------------------------------------------------------------------


def component_score(key: str, records: list[SimulationRecord]) -> SimComponentScore:
    ok = [r for r in records if r.status == "ok"]
    windows = [w for r in ok for w in r.windows if w.predicted is not None]

    def pooled(ws: list[WindowRecord]) -> float | None:
        truth = [float(x) for w in ws for x in w.truth]
        pred = [x for w in ws for x in (w.predicted or [])]
        return pearson(truth, pred) if truth else None

    return SimComponentScore(
        key=key,
        correlation=pooled(windows),
        correlation_activating=pooled([w for w in windows if w.kind != "non-activating"]),
        mean_window_correlation=mean_or_none([w.correlation for w in windows]),
        n_windows=len(windows),
        n_ok=len(ok),
        n_failed=sum(r.status == "failed" for r in records),
    )


# -- running ----------------------------------------------------------------------------------


def _run_key(judge: str, harvest_run: str, config: SimulationConfig) -> str:
    fields = config.model_dump(
        include={
            "n_components", "n_trials", "seed", "max_example_tokens", "n_top", "n_quantile",
            "n_nonactivating", "label_model", "mode", "top_logprobs", "positives", "n_quantiles",
            "negatives", "density_tolerance",
        }
    )  # fmt: skip
    blob = json.dumps([SUITE, judge, harvest_run, fields], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_simulation(adapter: DecompositionAdapter, config: SimulationConfig) -> SimulationResult:
    from spd_host.autointerp.registry import get_provider
    from spd_host.evals.llm.records import TrialLog, open_ledger_at
    from spd_host.evals.llm.requests import held_in_batches, scope_of
    from spd_host.plugins import get_host

    llm = config.llm()
    provider = get_provider(llm.provider)
    if (
        config.mode == "logprobs"
        and not provider.baseline
        and provider.name not in LOGPROB_PROVIDERS
    ):
        raise ConfigError(
            f"simulation --mode logprobs needs token logprobs, which provider {provider.name!r} "
            "does not return",
            hint=f"use one of {', '.join(LOGPROB_PROVIDERS)}, or --mode json",
        )
    model = llm.model or provider.default_model
    judge = f"{provider.name}/{'baseline-judge' if provider.baseline else model}"
    trials, skipped, setup = build_trials(adapter, config)
    harvest_run = str(setup.repo.run)
    storage_key = get_host().parse_id(adapter.decomposition_id).storage_key
    run_key = _run_key(judge, harvest_run, config)
    log = TrialLog(storage_key, SUITE, run_key, SimulationRecord)
    lock = RunLock(log.lock_path, f"{SUITE} eval of {adapter.decomposition_id}")
    spent, capped = 0.0, False
    with lock, open_ledger_at(log.ledger_path) as ledger:
        done = {} if config.force else log.done()
        labels = {t.trial_id: t.label for t in trials}
        # a record is reused only for the label it scored (a relabelled component is redone)
        records = {k: r for k, r in done.items() if r.label == labels.get(k)}
        todo = [t for t in trials if t.trial_id not in records]
        with log.sink() as write:

            def keep(rec: SimulationRecord) -> None:
                records[rec.trial_id] = rec
                write(rec)

            if provider.baseline:
                for t in todo:
                    top = {s.token for s in setup.repo.token_stats(t.key, "input", top=10).top_pmi}
                    keep(_record(t, baseline_prediction(t, top), None))
            else:
                spent, capped = _judge(todo, config, setup, adapter, keep, ledger, run_key)
        held = held_in_batches(
            ledger, scope_of(SUITE, llm, run_key), [t.trial_id for t in todo if t.trial_id not in records]
        )  # fmt: skip
    return _result(adapter, config, trials, records, skipped, harvest_run, judge, provider.baseline, setup, spent, capped, held)  # fmt: skip


def _judge(
    todo: list[SimTrial],
    config: SimulationConfig,
    setup: Setup,
    adapter: DecompositionAdapter,
    keep: Any,
    ledger: Any,
    run_key: str,
) -> tuple[float, bool]:
    """Judge ``todo`` through the shared request loop (synchronous, or ``--batch`` through
    the provider's batch API, resumable under the suite's run key)."""
    from spd_host.evals.llm.requests import Calls, scope_of, send_all

    summary = {c.key: c for c in setup.repo.summary()}
    sites = {s.name: s for s in adapter.sites}

    def request(t: SimTrial) -> CompletionRequest:
        c = summary[t.key]
        return CompletionRequest(
            system=SYSTEM,
            prompt=prompt_for(t, setup.decode),
            schema=SCHEMA,
            max_output_tokens=config.max_output_tokens,
            evidence=ComponentEvidence(
                component_key=t.key,
                site=c.site,
                location=sites[c.site].reads_from,
                method_name=adapter.method.name,
                method_description=adapter.method.description,
                firing_density=min(1.0, c.density),
                firing_count=c.firing_count,
            ),
            answer_format="object",
            top_logprobs=config.top_logprobs if config.mode == "logprobs" else None,
        )

    def accept(t: SimTrial, c: Completion) -> tuple[list[list[float]], int]:
        data = c.data or {}
        written = parse_windows(data, [len(w.tokens) for w in t.windows])
        if config.mode == "logprobs":
            return expected_windows(c, data, written)
        return [[float(x) for x in row] for row in written], 0

    def on_outcome(t: SimTrial, out: Outcome) -> None:
        if out.ok:
            predicted, fallback = out.value
            keep(_record(t, predicted, out, fallback))
            return
        keep(
            SimulationRecord(
                trial_id=t.trial_id,
                component_key=t.key,
                label=t.label,
                status="failed",
                windows=[
                    WindowRecord(
                        kind=w.kind, quantile=w.quantile, fires_alone=w.fires_alone, truth=truth
                    )
                    for w, truth in zip(t.windows, t.truth, strict=True)
                ],
                error=out.error or "no attempt completed",
                cost_usd=out.cost,
                attempts=out.attempts,
            )
        )

    calls = Calls(
        item_id=lambda t: t.trial_id, make_request=request, accept=accept, on_outcome=on_outcome
    )
    return send_all(todo, config.llm(), calls, ledger, scope_of(SUITE, config.llm(), run_key))


def _result(
    adapter: DecompositionAdapter,
    config: SimulationConfig,
    trials: list[SimTrial],
    records: dict[str, SimulationRecord],
    skipped: dict[str, str],
    harvest_run: str,
    judge: str,
    baseline: bool,
    setup: Setup,
    spent: float,
    capped: bool,
    held: tuple[int, list[str]] = (0, []),
) -> SimulationResult:
    final = [records[t.trial_id] for t in trials if t.trial_id in records]
    by_key: dict[str, list[SimulationRecord]] = {}
    for r in final:
        by_key.setdefault(r.component_key, []).append(r)
    comps = [component_score(k, rs) for k, rs in sorted(by_key.items())]
    notes = []
    if baseline:
        notes.append("offline BASELINE judge (10 on top-PMI input tokens, else 0), not an LLM")
    if capped:
        notes.append("stopped by the cost cap: some trials were not sent")
    if held[0]:
        from spd_host.evals.llm.requests import held_note

        notes.append(held_note(*held))
    if setup.baseline_labels:
        notes.append("scored labels include offline BASELINE labels, not an LLM's")
    n_fallback = sum(r.n_values_from_text for r in final)
    if n_fallback:
        notes.append(f"logprobs mode: {n_fallback} values read from the text (no logprobs there)")
    return SimulationResult(
        suite=SUITE,
        **result_header(adapter, config, harvest_run, notes),
        judge=judge,
        baseline=baseline,
        mode=config.mode,
        score=mean_or_none([c.correlation for c in comps]),
        score_activating=mean_or_none([c.correlation_activating for c in comps]),
        score_window_mean=mean_or_none([c.mean_window_correlation for c in comps]),
        n_components=len({t.key for t in trials}) + len(skipped),
        n_components_scored=sum(c.correlation is not None for c in comps),
        n_trials_ok=sum(r.status == "ok" for r in final),
        n_trials_failed=sum(r.status == "failed" for r in final),
        n_trials_not_sent=sum(1 for t in trials if t.trial_id not in records),
        n_trials_in_open_batches=held[0],
        skipped=skipped,
        spent_usd=spent,
        stopped_by_cost_cap=capped,
        components=comps,
        trials=final,
    )

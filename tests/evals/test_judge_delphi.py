"""The delphi convention of the detection and fuzzing suites, end to end through the real OpenAI
SDK and the local 127.0.0.1 server (which speaks OpenAI's ``logprobs`` wire format).

delphi's aggregation (``delphi/log/result_analysis.py``) is written out again here from its
definitions — one confusion matrix over every example of every component, precision / recall /
F1 / class-balanced accuracy, frequency-weighted F1 (per site, weighted by firing counts, then
the mean over sites), and AUROC as the area under the ROC polyline (trapezoids) — and compared
with the suite's result on hand-made judge answers."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from typing import Any

import pytest
from llm_server import LLMServer, Reply, Request, digit_logprobs

from spd_host.errors import ConfigError
from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.suites import build_trials
from spd_host.evals.llm.trials import cut, cut_activations
from spd_host.plugins import get_host
from tests.evals.test_judge_suites import _write_labels

TRIAL = re.compile(r"Trial (\S+)")
EXAMPLE = re.compile(r"^Example (\d+):", re.M)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")


def _config(server: LLMServer, **kw: Any) -> JudgeSuiteConfig:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "base_url": server.openai_url,
        "n_components": 8,
        "n_trials": 2,
        "backoff_base_s": 0.01,
        "max_concurrent": 4,
        "convention": "delphi",
    }
    base.update(kw)
    return JudgeSuiteConfig(**base)


def _reply(decisions: list[int], **kw: Any) -> Reply:
    answer = {"label": json.dumps(decisions), "confidence": "high", "reasoning": "test judge"}
    return Reply(answer=answer, **kw)


# ---- delphi's definitions, written out -------------------------------------------------------


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _metrics(rows: list[tuple[bool, bool]]) -> dict[str, float]:
    """rows: (activating, predicted) of the examples that have a prediction."""
    tp = sum(a and p for a, p in rows)
    fp = sum(p and not a for a, p in rows)
    fn = sum(a and not p for a, p in rows)
    tn = sum(not a and not p for a, p in rows)
    prec, rec = _div(tp, tp + fp), _div(tp, tp + fn)
    return {
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        "precision": prec, "recall": rec,
        "f1": _div(2 * prec * rec, prec + rec),
        "accuracy": (_div(tp, tp + fn) + _div(tn, tn + fp)) / 2,
    }  # fmt: skip


def _trapezoid_auc(labels: list[bool], scores: list[float]) -> float:
    """Area under the ROC polyline through every distinct threshold."""
    pos = sum(labels)
    neg = len(labels) - pos
    pts = [(0.0, 0.0)]
    for t in sorted(set(scores), reverse=True):
        tpr = sum(1 for y, s in zip(labels, scores, strict=True) if y and s >= t) / pos
        fpr = sum(1 for y, s in zip(labels, scores, strict=True) if not y and s >= t) / neg
        pts.append((fpr, tpr))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))


# ---- tests ----------------------------------------------------------------------------------


def test_delphi_figures_equal_delphis_formulas_on_hand_made_answers(harvested: str) -> None:
    """A noisy judge with P(1) per example (ties included, a third alternative ' 1' that
    counts towards P(1)); one prompt in seven answers a list of the wrong length (a failure).
    Pooled and per-component confusion, F1, precision, recall, balanced accuracy, weighted F1
    and AUROC equal the formulas above to 1e-9."""
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    rng = random.Random(3)
    answered: dict[str, tuple[list[int], list[float]] | None] = {}
    with LLMServer() as server:
        config = _config(server, max_attempts=1)
        adapter = get_host().load_adapter(harvested)
        trials, _, _ = build_trials("detection", adapter, config)
        truth = {t.trial_id: t for t in trials}

        def plan(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            n = len(EXAMPLE.findall(req.prompt))
            if len(answered) % 7 == 3 and tid not in answered:
                answered[tid] = None
                return _reply([1] * (n + 1))
            probs = []
            for i in range(1, n + 1):
                base = 0.7 if i in truth[tid].truth else 0.35
                probs.append(round(min(0.95, max(0.05, base + rng.uniform(-0.3, 0.3))), 1))
            decisions = [int(p >= 0.5) if rng.random() < 0.8 else int(p < 0.5) for p in probs]
            answered[tid] = (decisions, probs)
            text = json.dumps(
                {"label": json.dumps(decisions), "confidence": "high", "reasoning": "test judge"}
            )
            return _reply(decisions, logprobs=digit_logprobs(text, probs, noise=" 1"))

        server.plan = plan
        result = run_suite("detection", harvested, config)
        body = server.requests[0].body
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert all(len(t.items) <= 5 for t in trials)  # delphi's n_examples_shown
    assert result.convention == "delphi" and result.delphi is not None
    assert 0 < result.n_trials_failed < len(trials)

    rows: dict[str, list[tuple[bool, bool, float]]] = {}
    n_failed = 0
    for tid, ans in answered.items():
        t = truth[tid]
        if ans is None:
            n_failed += len(t.items)
            continue
        decisions, probs = ans
        for i, (d, p) in enumerate(zip(decisions, probs, strict=True), 1):
            p1 = p * (1 - 1e-3) + 1e-3  # ' 1' contains "1": it adds to P(1)
            rows.setdefault(t.key, []).append((i in t.truth, bool(d), p1))
    every = [r for v in rows.values() for r in v]
    want = _metrics([(a, p) for a, p, _ in every])
    pooled = result.delphi.pooled
    assert (pooled.true_positives, pooled.true_negatives) == (want["tp"], want["tn"])
    assert (pooled.false_positives, pooled.false_negatives) == (want["fp"], want["fn"])
    assert pooled.failed == n_failed
    for ours, theirs in [("precision", "precision"), ("recall", "recall"),
                         ("f1_score", "f1"), ("accuracy", "accuracy")]:  # fmt: skip
        assert getattr(pooled, ours) == pytest.approx(want[theirs], abs=1e-9)
    assert result.score == pytest.approx(want["accuracy"], abs=1e-9)
    auc = _trapezoid_auc([a for a, _, _ in every], [s for _, _, s in every])
    assert pooled.auc == pytest.approx(auc, abs=1e-9)
    assert pooled.n_with_probability == len(every)

    summary = {c.key: c for c in HarvestRepo.open(harvested).summary()}
    f1 = {k: _metrics([(a, p) for a, p, _ in v])["f1"] for k, v in rows.items()}
    sites = sorted({summary[k].site for k in f1})
    assert len(sites) >= 2  # else per-site and global weighting agree
    per_site = []
    for s in sites:
        keys = [k for k in f1 if summary[k].site == s]
        w = sum(summary[k].firing_count for k in keys)
        per_site.append(sum(f1[k] * summary[k].firing_count for k in keys) / w)
    assert result.delphi.weighted_f1 == pytest.approx(sum(per_site) / len(per_site), abs=1e-9)
    comps = {c.key: c for c in result.delphi.components}
    for k, v in rows.items():
        assert comps[k].f1_score == pytest.approx(f1[k], abs=1e-9)
        labels = [a for a, _, _ in v]
        if any(labels) and not all(labels):
            got = comps[k].auc
            assert got == pytest.approx(_trapezoid_auc(labels, [s for _, _, s in v]), abs=1e-9)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("detection", {}),
        ("fuzzing", {"fuzz_type": "default"}),
        ("fuzzing", {"fuzz_type": "active"}),
    ],
)
def test_oracle_judge_scores_one_under_delphi(harvested: str, kind: str, extra: dict) -> None:
    _write_labels(harvested)
    with LLMServer() as server:
        config = _config(server, **extra)
        adapter = get_host().load_adapter(harvested)
        trials, _, _ = build_trials(kind, adapter, config)  # type: ignore[arg-type]
        truth = {t.trial_id: t for t in trials}

        def oracle(req: Request) -> Reply:
            t = truth[TRIAL.search(req.prompt).group(1)]  # type: ignore[union-attr]
            return _reply([int(i in t.truth) for i in range(1, len(t.items) + 1)])

        server.plan = oracle
        result = run_suite(kind, harvested, config)
    assert result.delphi is not None and result.n_trials_failed == 0
    pooled = result.delphi.pooled
    assert result.score == pytest.approx(1.0) and pooled.f1_score == pytest.approx(1.0)
    assert pooled.auc == pytest.approx(1.0)  # certain logprobs: P(1) is the decision
    assert result.delphi.weighted_f1 == pytest.approx(1.0)
    assert pooled.total_positives > 0 and pooled.total_negatives > 0


def test_random_judge_scores_near_chance_under_delphi(harvested: str) -> None:
    _write_labels(harvested)
    rng = random.Random(11)

    def plan(req: Request) -> Reply:
        n = len(EXAMPLE.findall(req.prompt))
        return _reply([rng.randint(0, 1) for _ in range(n)])

    with LLMServer(plan=plan) as server:
        result = run_suite("detection", harvested, _config(server, n_components=16, n_trials=3))
    assert result.delphi is not None
    assert 0.35 < result.delphi.pooled.accuracy < 0.65
    assert 0.3 < (result.delphi.pooled.auc or 0) < 0.7


@pytest.mark.parametrize(
    "answer",
    ["[1, 0]", "yes to all", "[1, 2, 0, 1, 0]", '[1, 0, 1, 0, "1"]', "[1, 0, 1, 0, 0.5]", "[1, 0"],
)
def test_a_malformed_01_answer_is_a_failed_trial(harvested: str, answer: str) -> None:
    _write_labels(harvested)

    def plan(req: Request) -> Reply:
        n = len(EXAMPLE.findall(req.prompt))
        text = answer if n == 5 else json.dumps([0] * (n + 1))
        return Reply(answer={"label": text, "confidence": "high", "reasoning": "r"})

    with LLMServer(plan=plan) as server:
        result = run_suite(
            "detection", harvested, _config(server, max_attempts=1, n_components=3, n_trials=1)
        )
    assert result.n_trials_ok == 0 and result.n_trials_failed == len(result.trials) > 0
    assert result.score is None and result.delphi is not None
    assert result.delphi.pooled.total_examples == 0 and result.delphi.pooled.failed > 0
    assert all("malformed answer" in (t.error or "") for t in result.trials)


def test_missing_logprobs_are_said_not_invented(harvested: str) -> None:
    _write_labels(harvested)

    def plan(req: Request) -> Reply:
        n = len(EXAMPLE.findall(req.prompt))
        return _reply([1] * n, no_logprobs=True)

    with LLMServer(plan=plan) as server:
        result = run_suite("detection", harvested, _config(server, n_components=3, n_trials=1))
        asked = server.requests[0].body
        run_suite(
            "detection", harvested, _config(server, n_components=3, n_trials=1, logprobs=False)
        )
        not_asked = server.requests[-1].body
    assert asked["logprobs"] is True and "logprobs" not in not_asked
    assert result.delphi is not None and result.delphi.pooled.auc is None
    assert any("no usable logprobs" in n for n in result.notes)
    assert all(t.probabilities is None for t in result.trials)


def test_delphi_options_are_refused_for_intruder(harvested: str) -> None:
    with pytest.raises(ConfigError, match="detection and fuzzing"):
        run_suite("intruder", harvested, JudgeSuiteConfig(provider="offline", convention="delphi"))


@pytest.mark.parametrize("fuzz_type", ["default", "active"])
def test_delphi_fuzzing_marks(harvested: str, fuzz_type: str) -> None:
    """Right marks: activation >= 0.3 x the window's max. default: the wrong items are windows
    the component never fires on, marked at ceil(mean firing tokens of the trial's activating
    examples) tokens, the token at n - n//4 among them, the rest as random.Random(22).sample
    picks them; active: each activating window is shown twice, the wrong copy marked only at
    tokens at most 0.3 x max."""
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    config = JudgeSuiteConfig(
        provider="offline", n_components=8, n_trials=2, fuzz_type=fuzz_type, mark_rule="delphi"
    )
    trials, _, _ = build_trials("fuzzing", adapter, config)
    repo = HarvestRepo.open(harvested)
    act_type = adapter.activation_types[0]
    assert trials
    for t in trials:
        examples = [*repo.component(t.key).top_examples, *repo.component(t.key).reservoir_examples]
        windows = {}
        for e in examples:
            s = cut(e, config.max_example_tokens)
            windows[s.tokens] = (s, cut_activations(e, config.max_example_tokens, act_type))
        rights = [t.items[i - 1] for i in sorted(t.truth)]
        k = math.ceil(sum(sum(windows[r.tokens][0].marks) for r in rights) / len(rights))
        for r in rights:
            acts = windows[r.tokens][1]
            assert list(r.marks) == [a >= 0.3 * max(acts) for a in acts]
        wrongs = [it for i, it in enumerate(t.items, 1) if i not in t.truth]
        assert wrongs
        for w in wrongs:
            marked = {j for j, m in enumerate(w.marks) if m}
            n = len(w.tokens)
            if fuzz_type == "active":
                acts = windows[w.tokens][1]
                assert any(r.tokens == w.tokens for r in rights)
                eligible = [j for j in range(n) if acts[j] <= 0.3 * max(acts)]
            else:
                eligible = list(range(n))
            assert marked <= set(eligible)
            assert len(marked) == min(max(1, k), len(eligible))
            anchor = n - n // 4
            if anchor in eligible:
                rest = [j for j in eligible if j != anchor]
                want = {anchor, *random.Random(22).sample(rest, len(marked) - 1)}
            else:
                want = set(random.Random(22).sample(eligible, len(marked)))
            assert marked == want

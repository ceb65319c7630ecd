"""Intruder, detection and fuzzing end to end: toy harvest -> trials -> the real OpenAI SDK ->
local 127.0.0.1 server -> scores. An oracle judge must score 1.0, a random judge near chance,
and failed calls must be recorded as failures, never as zeros."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from llm_server import LLMServer, Reply, Request

from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.suites import build_trials, trials_path
from spd_host.plugins import get_host
from tests.evals.conftest import THRESHOLD

TRIAL = re.compile(r"Trial (\S+)")


def _config(server: LLMServer, **kw: Any) -> JudgeSuiteConfig:
    base = {
        "provider": "openai",
        "model": "gpt-4.1-mini",
        "base_url": server.openai_url,
        "n_components": 12,
        "n_trials": 3,
        "backoff_base_s": 0.01,
        "max_concurrent": 4,
    }
    base.update(kw)
    return JudgeSuiteConfig(**base)


def _answer(text: str) -> Reply:
    return Reply(answer={"label": text, "confidence": "high", "reasoning": "test judge"})


def _oracle(truths: dict[str, frozenset[int]]):
    def plan(req: Request) -> Reply:
        tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
        return _answer(", ".join(map(str, sorted(truths[tid]))) or "none")

    return plan


def _write_labels(did: str) -> None:
    from spd_host.autointerp.store import LabelRecord, LabelStore, default_db_path
    from spd_host.harvest import HarvestRepo

    repo = HarvestRepo.open(did)
    key = get_host().parse_id(did).storage_key
    with LabelStore(default_db_path(key)) as store:
        for c in repo.summary():
            store.write(
                LabelRecord(
                    harvest_id=repo.run, component_key=c.key, strategy="s", model="m",
                    provider="p", decomposition_id=did, status="ok", is_baseline=False,
                    label=f"label of {c.key}", confidence="high", reasoning="", raw_response="",
                    system_prompt="", prompt="", error=None, cost_usd=0.0, input_tokens=0,
                    output_tokens=0, attempts=1, started_at="t", finished_at="t",
                )
            )  # fmt: skip


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-real")


@pytest.mark.parametrize("kind", ["intruder", "detection", "fuzzing"])
def test_oracle_judge_scores_one(harvested: str, kind: str) -> None:
    if kind != "intruder":
        _write_labels(harvested)
    with LLMServer() as server:
        config = _config(server)
        adapter = get_host().load_adapter(harvested)
        trials, _, _ = build_trials(kind, adapter, config)  # type: ignore[arg-type]
        assert len(trials) >= 12
        server.plan = _oracle({t.trial_id: t.truth for t in trials})
        result = run_suite(kind, harvested, config)
    assert result.score == pytest.approx(1.0)
    assert result.n_trials_ok == len(trials) and result.n_trials_failed == 0
    assert not result.baseline and result.harvest_run
    assert len(server.requests) == len(trials)


@pytest.mark.parametrize(("kind", "lo", "hi"), [("intruder", 0.05, 0.4), ("detection", 0.35, 0.65)])
def test_random_judge_scores_near_chance(harvested: str, kind: str, lo: float, hi: float) -> None:
    if kind != "intruder":
        _write_labels(harvested)
    rng = random.Random(7)

    def plan(req: Request) -> Reply:
        n = len(re.findall(r"^Example \d+:", req.prompt, flags=re.M))
        if kind == "intruder":
            return _answer(str(rng.randint(1, n)))
        picked = [i for i in range(1, n + 1) if rng.random() < 0.5]
        return _answer(", ".join(map(str, picked)) or "none")

    with LLMServer(plan=plan) as server:
        result = run_suite(kind, harvested, _config(server, n_components=20, n_trials=4))
    assert result.chance == (0.2 if kind == "intruder" else 0.5)
    assert lo < result.score < hi


def test_failures_are_recorded_not_scored_and_resume_retries_them(harvested: str) -> None:
    with LLMServer() as server:
        config = _config(server, max_attempts=1)
        adapter = get_host().load_adapter(harvested)
        trials, _, _ = build_trials("intruder", adapter, config)
        truths = {t.trial_id: t.truth for t in trials}
        failing = {t.trial_id for t in trials[::3]}
        oracle = _oracle(truths)

        def flaky(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            return Reply(status=500) if tid in failing else oracle(req)

        server.plan = flaky
        first = run_suite("intruder", harvested, config)
        assert first.n_trials_failed == len(failing)
        assert first.score == pytest.approx(1.0)  # failures are not zeros
        failed = [t for t in first.trials if t.status == "failed"]
        assert all(t.score is None and t.error for t in failed)
        n_first = len(server.requests)

        server.plan = oracle
        second = run_suite("intruder", harvested, config)
        assert len(server.requests) - n_first == len(failing)  # only the failed ones again
        assert second.n_trials_failed == 0 and second.n_trials_ok == len(trials)
    key = get_host().parse_id(harvested).storage_key
    lines = trials_path(key, "intruder").read_text().splitlines()
    assert len(lines) == len(trials) + len(failing)
    assert all(json.loads(x)["record"]["trial_id"] in truths for x in lines)


def test_offline_provider_runs_the_baseline_judge_and_says_so(harvested: str) -> None:
    result = run_suite("intruder", harvested, JudgeSuiteConfig(provider="offline", n_components=6))
    assert result.baseline
    assert "BASELINE" in result.judge.upper() or "baseline" in result.judge
    assert any("baseline" in n.lower() for n in result.notes)
    assert result.score is not None and result.n_trials_failed == 0
    again = run_suite("intruder", harvested, JudgeSuiteConfig(provider="offline", n_components=6))
    assert again.score == result.score  # deterministic


def test_trials_obey_the_sampling_rules(harvested: str) -> None:
    from spd_host.harvest import HarvestRepo

    _write_labels(harvested)
    adapter = get_host().load_adapter(harvested)
    config = JudgeSuiteConfig(provider="offline", n_components=10, n_trials=2)
    repo = HarvestRepo.open(harvested)
    density = {c.key: c.density for c in repo.summary()}
    model = adapter.load_base_model()
    from tests.evals.toy_plugin import pre_acts

    def fires(key: str, tokens: tuple[int, ...]) -> list[bool]:
        import torch

        site, idx = key.rsplit(":", 1)
        layer = int(site.split(".")[0])
        seen = {}
        h = model.transformer.h[layer].mlp.register_forward_pre_hook(
            lambda _m, a: seen.__setitem__("x", a[0])
        )
        with torch.no_grad():
            model(torch.tensor([tokens]))
        h.remove()
        return (pre_acts(model, layer, seen["x"])[0, :, int(idx)] > THRESHOLD).tolist()

    intr, _, _ = build_trials("intruder", adapter, config)
    for t in intr:
        (pos,) = t.truth
        intruder = t.items[pos - 1]
        assert not any(fires(t.key, intruder.tokens))
        for i, item in enumerate(t.items, 1):  # the real ones are marked where they fired
            if i != pos:  # (a window alone may lack the context that made it fire)
                assert any(item.marks)
    det, _, _ = build_trials("detection", adapter, config)
    for t in det:
        for i, item in enumerate(t.items, 1):
            if i not in t.truth:
                assert not any(fires(t.key, item.tokens))
            assert not any(item.marks)
    fuzz, _, _ = build_trials("fuzzing", adapter, config)
    for t in fuzz:
        for i, item in enumerate(t.items, 1):
            real = fires(t.key, item.tokens)
            marked = [j for j, m in enumerate(item.marks) if m]
            assert marked
            if i not in t.truth:
                assert not any(real[j] for j in marked)
                truly = [
                    e for e in repo.component(t.key).top_examples if tuple(e.tokens) == item.tokens
                ]
                for e in truly:
                    assert not any(e.firings[j] for j in marked)
    assert density  # the harvest exists and has components


@pytest.mark.parametrize("answer", ["none", "1, 2", "   "])
def test_an_intruder_answer_that_is_not_one_number_is_a_failed_trial(
    harvested: str, answer: str
) -> None:
    with LLMServer(plan=lambda req: _answer(answer)) as server:
        result = run_suite("intruder", harvested, _config(server, max_attempts=1, n_trials=1))
    assert result.n_trials_ok == 0 and result.n_trials_failed == len(result.trials) > 0
    assert result.score is None  # never a score of 0
    assert all("malformed answer" in (t.error or "") for t in result.trials)


def test_judge_suites_are_capped_by_default_and_across_resumes(harvested: str) -> None:
    """Output $1 per token, 300 max output tokens, input free: every call's worst case is
    $300 and the server bills 40 output tokens, $40. The default cap is $5 (no call fits);
    at $700 the calls go out while 40 (k - 1) + 300 <= 700, i.e. k <= 11; a resume at the
    same cap starts from the $440 spent and sends nothing."""
    assert JudgeSuiteConfig().cost_cap_usd == 5.0
    prices = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6, "max_concurrent": 1}
    with LLMServer() as server:
        capped = run_suite("intruder", harvested, _config(server, **prices))
        assert len(server.requests) == 0 and capped.stopped_by_cost_cap
        first = run_suite("intruder", harvested, _config(server, cost_cap_usd=700, **prices))
        assert len(server.requests) == 11 and first.spent_usd == pytest.approx(440)
        again = run_suite("intruder", harvested, _config(server, cost_cap_usd=700, **prices))
        assert len(server.requests) == 11 and again.stopped_by_cost_cap


@pytest.mark.parametrize("kind", ["intruder", "detection"])
@pytest.mark.parametrize("answer", ["", "   \n\t "])
def test_a_blank_judge_answer_is_a_failed_trial_not_a_crash(
    harvested: str, kind: str, answer: str
) -> None:
    """Issue #13: a blank or whitespace answer crashed the run (pydantic, after stripping)."""
    if kind != "intruder":
        _write_labels(harvested)
    with LLMServer() as server:
        server.plan = lambda req: _answer(answer)
        result = run_suite(kind, harvested, _config(server, max_attempts=1))
    assert result.n_trials_ok == 0 and result.n_trials_failed == len(result.trials) > 0
    assert all(t.status == "failed" and t.score is None and t.error for t in result.trials)
    assert result.score is None  # failures are never scored as zeros


def test_a_blank_label_is_not_judged(harvested: str) -> None:
    """A component whose stored label is blank is not a detection trial (and no crash)."""
    from spd_host.autointerp.store import LabelStore, default_db_path

    _write_labels(harvested)
    key = get_host().parse_id(harvested).storage_key
    with LabelStore(default_db_path(key)) as store:
        first = store.records()[0]
        store.write(first.model_copy(update={"label": "  \n\t "}), replace=True)
    with LLMServer() as server:
        config = _config(server, n_components=None)
        trials, _, _ = build_trials("detection", get_host().load_adapter(harvested), config)
        truths = {t.trial_id: t.truth for t in trials}
        server.plan = _oracle(truths)
        result = run_suite("detection", harvested, config)
    assert result.n_trials_failed == 0 and result.score == pytest.approx(1.0)
    assert first.component_key not in {t.key for t in trials}


def test_force_judges_every_trial_again(harvested: str) -> None:
    with LLMServer() as server:
        config = _config(server)
        trials, _, _ = build_trials("intruder", get_host().load_adapter(harvested), config)
        server.plan = _oracle({t.trial_id: t.truth for t in trials})
        first = run_suite("intruder", harvested, config)
        n = len(server.requests)
        assert run_suite("intruder", harvested, config).score == first.score
        assert len(server.requests) == n  # resumed: nothing judged twice
        forced = run_suite("intruder", harvested, config.model_copy(update={"force": True}))
        assert len(server.requests) == 2 * n and forced.score == first.score

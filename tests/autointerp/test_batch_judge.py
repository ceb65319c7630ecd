"""The LLM judge suites with ``--batch``: the same trials and scores as the synchronous judge,
through the OpenAI and Anthropic batch wire formats, resumable, failures recorded not scored."""

from __future__ import annotations

import re
from typing import Any

import pytest
from batch_server import BatchPlan, BatchServer
from llm_server import Reply, Request

from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.suites import build_trials
from spd_host.plugins import get_host
from tests.evals.conftest import harvested, toy_host  # noqa: F401  (fixtures)

TRIAL = re.compile(r"Trial (\S+)")
MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}


def _config(server: BatchServer, provider: str, **kw: Any) -> JudgeSuiteConfig:
    url = server.anthropic_url if provider == "anthropic" else server.openai_url
    base: dict[str, Any] = {
        "provider": provider, "model": MODELS[provider], "base_url": url,
        "n_components": 6, "n_trials": 2, "batch": True, "poll_interval_s": 0.05,
    }  # fmt: skip
    base.update(kw)
    return JudgeSuiteConfig(**base)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_intruder_suite_in_batches_scores_an_oracle_one_and_a_wrong_judge_zero(
    harvested: str,  # noqa: F811
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")  # toy_host clears it
    adapter = get_host().load_adapter(harvested)
    with BatchServer() as server:
        config = _config(server, provider)
        trials, _, _ = build_trials("intruder", adapter, config)
        truth = {t.trial_id: t.truth for t in trials}
        n = len(trials[0].items)
        wrong = {tid: (min(t) % n) + 1 for tid, t in truth.items()}  # a real example, not it

        def plan(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            pick = min(truth[tid]) if tid.endswith(("0", "2", "4", "6", "8")) else wrong[tid]
            return Reply(answer={"label": str(pick), "confidence": "high", "reasoning": "j"})

        server.plan = plan
        result = run_suite("intruder", harvested, config)
    assert result.n_trials_ok == len(trials) and result.n_trials_failed == 0
    assert len(server.creates) == 1 and len(server.requests) == len(trials)
    want = {
        t.trial_id: 1.0 if t.trial_id.endswith(("0", "2", "4", "6", "8")) else 0.0 for t in trials
    }
    assert {t.trial_id: t.score for t in result.trials} == want
    assert result.score == pytest.approx(
        sum(
            sum(want[t.trial_id] for t in trials if t.key == k)
            / sum(1 for t in trials if t.key == k)
            for k in {t.key for t in trials}
        )
        / len({t.key for t in trials})
    )


def test_expired_judge_requests_are_failed_trials_retried_on_rerun(
    harvested: str,  # noqa: F811
) -> None:
    adapter = get_host().load_adapter(harvested)
    with BatchServer(batch_plan=lambda n: BatchPlan(expire_after=3 if n == 0 else None)) as server:
        config = _config(server, "openai")
        trials, _, _ = build_trials("intruder", adapter, config)
        truth = {t.trial_id: t.truth for t in trials}

        def plan(req: Request) -> Reply:
            tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
            return Reply(
                answer={"label": str(min(truth[tid])), "confidence": "high", "reasoning": "j"}
            )

        server.plan = plan
        first = run_suite("intruder", harvested, config)
        assert first.n_trials_ok == 3 and first.n_trials_failed == len(trials) - 3
        assert all("expired" in (t.error or "") for t in first.trials if t.status == "failed")
        second = run_suite("intruder", harvested, config)
    assert second.n_trials_ok == len(trials) and second.score == pytest.approx(1.0)
    assert len(server.creates) == 2
    assert len(server.batches[server.creates[1]].items) == len(trials) - 3


def test_eval_cli_batch_flag_reaches_the_batch_api(harvested: str) -> None:  # noqa: F811
    import json as _json

    from typer.testing import CliRunner

    from spd_host.cli.app import app

    one = Reply(answer={"label": "1", "confidence": "low", "reasoning": "j"})
    with BatchServer(plan=lambda req: one) as server:
        out = CliRunner().invoke(
            app,
            ["eval", "intruder", harvested, "--provider", "openai", "--model", "gpt-4.1-mini",
             "--base-url", server.openai_url, "--n-components", "3", "--n-trials", "1",
             "--batch", "--poll-interval", "0.05", "--json"],
        )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(server.creates) == 1 and ("POST", "/v1/files") in server.calls
    (result,) = _json.loads(out.stdout)["results"]
    assert result["n_trials_ok"] == len(server.batches[server.creates[0]].items)


def test_a_failed_openai_batch_errors_every_request(harvested: str) -> None:  # noqa: F811
    """status "failed" (the input file was rejected): every trial failed with the reason."""
    with BatchServer(batch_plan=lambda n: BatchPlan(failed=True)) as server:
        result = run_suite("intruder", harvested, _config(server, "openai", n_components=3))
    assert result.n_trials_ok == 0 and result.n_trials_failed == len(result.trials) > 0
    assert all(
        "openai batch failed: invalid_request: bad file" in (t.error or "") for t in result.trials
    )

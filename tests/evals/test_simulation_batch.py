"""The simulation suite with ``--batch``: the same trials and correlations as the synchronous
judge, through the OpenAI and Anthropic batch wire formats of the loopback batch server (real
SDKs), expired requests failed and retried on a re-run, and the cost cap holding on the worst
case of what is in flight, across resumes."""

from __future__ import annotations

import re
from typing import Any

import pytest
from batch_server import BatchPlan, BatchServer
from llm_server import Reply, Request

from spd_host.evals import run_suite
from spd_host.evals.llm.scorer_configs import SimulationConfig
from tests.evals.test_judge_suites import _write_labels
from tests.evals.test_simulation import _answer, _check_scores_against_numpy, _truths

TRIAL = re.compile(r"Trial (\S+)")
MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4.1-mini"}


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def _config(server: BatchServer, provider: str = "openai", **kw: Any) -> SimulationConfig:
    url = server.anthropic_url if provider == "anthropic" else server.openai_url
    base: dict[str, Any] = {
        "provider": provider, "model": MODELS[provider], "base_url": url, "n_components": 6,
        "batch": True, "poll_interval_s": 0.05,
    }  # fmt: skip
    base.update(kw)
    return SimulationConfig(**base)


def _oracle(truths: dict[str, list[list[int]]]) -> Any:
    def plan(req: Request) -> Reply:
        return Reply(answer=_answer(truths[TRIAL.search(req.prompt).group(1)]))  # type: ignore[union-attr]

    return plan


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_oracle_simulation_in_one_batch_scores_one(
    harvested: str, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")  # toy_host clears it
    _write_labels(harvested)
    with BatchServer() as server:
        config = _config(server, provider)
        truths = _truths(harvested, config)
        server.plan = _oracle(truths)
        result = run_suite("simulation", harvested, config)
    assert len(server.creates) == 1 and len(server.requests) == len(truths)
    assert len(server.batches[server.creates[0]].items) == len(truths)
    assert result.n_trials_ok == len(truths) and result.n_trials_failed == 0
    assert result.score == pytest.approx(1.0) and result.score_window_mean == pytest.approx(1.0)
    _check_scores_against_numpy(result)


def test_expired_requests_are_failed_trials_resent_alone_on_rerun(harvested: str) -> None:
    _write_labels(harvested)
    with BatchServer(batch_plan=lambda n: BatchPlan(expire_after=2 if n == 0 else None)) as server:
        config = _config(server)
        truths = _truths(harvested, config)
        server.plan = _oracle(truths)
        first = run_suite("simulation", harvested, config)
        assert first.n_trials_ok == 2 and first.n_trials_failed == len(truths) - 2
        assert all("expired" in (t.error or "") for t in first.trials if t.status == "failed")
        second = run_suite("simulation", harvested, config)
    assert len(server.creates) == 2
    assert len(server.batches[server.creates[1]].items) == len(truths) - 2
    assert second.n_trials_ok == len(truths) and second.score == pytest.approx(1.0)


def test_batch_cost_cap_counts_what_is_in_flight_and_holds_across_resumes(harvested: str) -> None:
    """Input free, output $1/token (a hand-given price: billed as given), 300 max output
    tokens: each request's worst case is $300 and the server bills 40 tokens ($40). Under a
    $400 cap one request fits in flight at a time: batches of 1 while 40 k + 300 <= 400, so
    k = 0, 1, 2: three batches, $120; a resume at the same cap sends nothing."""
    _write_labels(harvested)
    prices = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 1e6}
    with BatchServer() as server:
        truths = _truths(harvested, _config(server))
        server.plan = _oracle(truths)
        cfg = _config(server, cost_cap_usd=400, max_output_tokens=300, **prices)
        first = run_suite("simulation", harvested, cfg)
        assert [len(server.batches[b].items) for b in server.creates] == [1, 1, 1]
        assert first.spent_usd == pytest.approx(120) and first.stopped_by_cost_cap
        assert first.n_trials_ok == 3 and first.n_trials_not_sent == len(truths) - 3
        again = run_suite("simulation", harvested, cfg)
        assert len(server.creates) == 3 and again.stopped_by_cost_cap
        assert again.n_trials_ok == 3


def test_simulation_cli_batch_flag_reaches_the_batch_api(harvested: str) -> None:
    import json

    from typer.testing import CliRunner

    from spd_host.cli.app import app

    _write_labels(harvested)
    with BatchServer() as server:
        truths = _truths(harvested, _config(server, n_components=3))
        server.plan = _oracle(truths)
        out = CliRunner().invoke(
            app,
            ["eval", "simulation", harvested, "--provider", "openai", "--model", "gpt-4.1-mini",
             "--base-url", server.openai_url, "--n-components", "3", "--batch",
             "--poll-interval", "0.05", "--json"],
        )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(server.creates) == 1 and ("POST", "/v1/files") in server.calls
    (result,) = json.loads(out.stdout)["results"]
    assert result["n_trials_ok"] == len(truths) and result["score"] == pytest.approx(1.0)

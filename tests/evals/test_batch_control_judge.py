"""Batch control for a judge suite (intruder): a synchronous run never sends a trial an open
batch holds and says how many it left out; ``cancel_batches`` keeps the trials that finished
before the cancel (billed at the batch price, scored) and fails the rest, which a re-run
retries; the CLI lists and cancels. Spend worked by hand from pricing.yaml: gpt-4.1-mini lists
$0.40 in / $1.60 out per MTok, half that in batches; every answer is 200 in, 10 out."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from batch_server import BatchPlan, BatchServer, interrupt_once_submitted
from llm_server import Reply, Request

from spd_host.evals import run_suite
from spd_host.evals.configs import JudgeSuiteConfig
from spd_host.evals.llm.records import spend_db_path
from spd_host.evals.llm.suites import build_trials
from spd_host.plugins import get_host

TRIAL = re.compile(r"Trial (\S+)")
SYNC = (200 * 0.40 + 10 * 1.60) / 1e6  # $0.000096 a trial
BATCH = SYNC / 2


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def _config(server: BatchServer, **kw: Any) -> JudgeSuiteConfig:
    base: dict[str, Any] = {
        "provider": "openai", "model": "gpt-4.1-mini", "base_url": server.openai_url,
        "n_components": 4, "n_trials": 2, "poll_interval_s": 0.05,
    }  # fmt: skip
    return JudgeSuiteConfig(**{**base, **kw})


def _oracle(truth: dict[str, frozenset[int]]) -> Callable[[Request], Reply]:
    def plan(req: Request) -> Reply:
        tid = TRIAL.search(req.prompt).group(1)  # type: ignore[union-attr]
        pick = str(min(truth[tid]))
        return Reply(
            answer={"label": pick, "confidence": "high", "reasoning": "j"},
            input_tokens=200,
            output_tokens=10,
        )

    return plan


def _sync_sent(server: BatchServer, since: int) -> int:
    in_batches = {req.index for b in server.batches.values() for _, req, _ in b.items}
    return sum(1 for r in server.requests[since:] if r.index not in in_batches)


def test_sync_run_skips_held_trials_and_cancel_keeps_what_finished(harvested: str) -> None:
    db = spend_db_path(get_host().parse_id(harvested).storage_key, "intruder")
    plan = BatchPlan(delay=60, done_by_cancel=3)
    with BatchServer(batch_plan=lambda n: plan) as server:
        config = _config(server)
        trials, _, _ = build_trials("intruder", get_host().load_adapter(harvested), config)
        n = len(trials)
        assert n >= 5
        server.plan = _oracle({t.trial_id: t.truth for t in trials})
        interrupt_once_submitted(
            lambda: run_suite("intruder", harvested, _config(server, batch=True)), db
        )
        # a synchronous run: every trial sits in the open batch, none is sent, all counted
        since = len(server.requests)
        sync = run_suite("intruder", harvested, config)
        assert _sync_sent(server, since) == 0
        assert (sync.n_trials_ok, sync.n_trials_not_sent, sync.n_trials_in_open_batches) == (
            0, n, n,
        )  # fmt: skip
        assert sync.spent_usd == 0
        assert any(server.creates[0] in note and "--cancel-batches" in note for note in sync.notes)
        # cancel: 3 finished before it (billed, scored 1: the oracle), the rest failed
        cancel = run_suite("intruder", harvested, _config(server, cancel_batches=True))
        assert server.cancels == [server.creates[0]] and len(server.creates) == 1
        assert (cancel.n_trials_ok, cancel.n_trials_failed) == (3, n - 3)
        assert cancel.spent_usd == pytest.approx(3 * BATCH)
        assert cancel.n_trials_in_open_batches == 0
        assert all(r.score == 1.0 for r in cancel.trials if r.status == "ok")
        with sqlite3.connect(db) as conn:
            (in_flight,) = conn.execute(
                "SELECT COUNT(*) FROM spend WHERE state='in_flight'"
            ).fetchone()
            (total,) = conn.execute(
                "SELECT SUM(CASE WHEN state='settled' THEN actual_usd ELSE reserved_usd END) "
                "FROM spend"
            ).fetchone()
        assert in_flight == 0 and total == pytest.approx(3 * BATCH)
        # a synchronous re-run sends only the cancelled ones
        since = len(server.requests)
        last = run_suite("intruder", harvested, config)
        assert _sync_sent(server, since) == n - 3
    assert (last.n_trials_ok, last.n_trials_failed, last.n_trials_not_sent) == (n, 0, 0)
    assert last.spent_usd == pytest.approx((n - 3) * SYNC) and last.score == pytest.approx(1.0)


def test_cli_lists_and_cancels_a_judge_suites_batches(harvested: str) -> None:
    from typer.testing import CliRunner

    from spd_host.cli.app import app

    db = spend_db_path(get_host().parse_id(harvested).storage_key, "intruder")
    plan = BatchPlan(delay=60, done_by_cancel=0)
    runner = CliRunner()
    with BatchServer(batch_plan=lambda n: plan) as server:
        config = _config(server)
        trials, _, _ = build_trials("intruder", get_host().load_adapter(harvested), config)
        server.plan = _oracle({t.trial_id: t.truth for t in trials})
        interrupt_once_submitted(
            lambda: run_suite("intruder", harvested, _config(server, batch=True)), db
        )
        args = ["eval", "intruder", harvested, "--provider", "openai", "--model", "gpt-4.1-mini",
                "--base-url", server.openai_url, "--n-components", "4", "--n-trials", "2"]  # fmt: skip
        listed = runner.invoke(app, [*args, "--list-batches", "--json"])
        assert listed.exit_code == 0, listed.output
        (row,) = json.loads(listed.stdout)
        assert (row["provider_batch_id"], row["provider"]) == (server.creates[0], "openai")
        assert row["n_requests"] == row["pending"] == len(trials) and row["reserved_usd"] > 0
        assert server.cancels == []  # listing sends nothing
        done = runner.invoke(app, [*args, "--cancel-batches", "--poll-interval", "0.05", "--json"])
        assert done.exit_code == 0, done.output
        assert server.cancels == [server.creates[0]]
        (result,) = json.loads(done.stdout)["results"]
        assert (result["n_trials_ok"], result["n_trials_failed"]) == (0, len(trials))
        assert result["spent_usd"] == 0
        again = runner.invoke(app, [*args, "--list-batches", "--json"])
        assert json.loads(again.stdout) == []


def test_simulation_sync_run_skips_held_trials_and_cancel_keeps_what_finished(
    harvested: str,
) -> None:
    """The simulation suite through the same loop: its trials held by an open batch are not
    sent by a synchronous run; a cancel keeps the 2 that finished (default answers: 100 in,
    40 out, so $0.000052 each at the batch price) and fails the rest."""
    from spd_host.evals.llm.scorer_configs import SimulationConfig
    from tests.evals.test_judge_suites import _write_labels
    from tests.evals.test_simulation_batch import _oracle, _truths

    _write_labels(harvested)
    db = spend_db_path(get_host().parse_id(harvested).storage_key, "simulation")
    plan = BatchPlan(delay=60, done_by_cancel=2)
    with BatchServer(batch_plan=lambda n: plan) as server:
        base: dict[str, Any] = {
            "provider": "openai", "model": "gpt-4.1-mini", "base_url": server.openai_url,
            "n_components": 6, "poll_interval_s": 0.05,
        }  # fmt: skip
        config = SimulationConfig(**base)
        truths = _truths(harvested, config)
        n = len(truths)
        server.plan = _oracle(truths)
        batched = SimulationConfig(**base, batch=True)
        interrupt_once_submitted(lambda: run_suite("simulation", harvested, batched), db)
        since = len(server.requests)
        sync = run_suite("simulation", harvested, config)
        assert _sync_sent(server, since) == 0
        assert (sync.n_trials_in_open_batches, sync.n_trials_not_sent, sync.spent_usd) == (n, n, 0)
        cancel = run_suite("simulation", harvested, SimulationConfig(**base, cancel_batches=True))
    assert (cancel.n_trials_ok, cancel.n_trials_failed) == (2, n - 2)
    assert cancel.spent_usd == pytest.approx(2 * (100 * 0.40 + 40 * 1.60) / 1e6 / 2)
    assert cancel.n_trials_in_open_batches == 0 and server.cancels == [server.creates[0]]

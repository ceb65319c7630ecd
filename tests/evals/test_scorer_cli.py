"""``spd-host eval simulation | embedding | surprisal`` through typer on the toy harvest, with
the offline baselines: exit 0, results saved as versioned JSON, baselines said so."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.evals import load_result, result_path
from spd_host.evals.llm.local_scorer import LocalScorerResult
from spd_host.evals.llm.simulation import SimulationResult
from spd_host.plugins import get_host
from tests.evals.test_judge_suites import _write_labels

runner = CliRunner()


def test_scorer_commands_run_the_baselines_and_save_results(harvested: str) -> None:
    _write_labels(harvested)
    key = get_host().parse_id(harvested).storage_key
    out = runner.invoke(
        app, ["eval", "simulation", harvested, "--provider", "offline", "--n-components", "3"]
    )
    assert out.exit_code == 0, out.output
    assert "BASELINE" in out.stdout
    sim = load_result(result_path(key, "simulation"), SimulationResult)
    assert sim.baseline and sim.n_components == 3

    out = runner.invoke(
        app, ["eval", "embedding", harvested, "--model", "offline", "--n-components", "3", "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["results"][0]["baseline"] is True
    emb = load_result(result_path(key, "embedding"), LocalScorerResult)
    assert emb.n_components == 3 and emb.score is not None

    out = runner.invoke(
        app,
        ["eval", "surprisal", harvested, "--n-components", "2", "--n-activating", "2",
         "--n-nonactivating", "2"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    sur = load_result(result_path(key, "surprisal"), LocalScorerResult)
    assert sur.n_components_scored == 2

    out = runner.invoke(app, ["eval", "embedding", harvested, "--model", "/no/such/model"])
    assert out.exit_code != 0 and "local Hugging Face cache" in out.output

"""``spd-host eval`` end to end through typer: tables, JSON files, --json, --wandb (offline),
plugin-registered suites, and several IDs in one comparison table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.evals import EvalResult, EvalSuite, load_result, result_path
from spd_host.evals.fidelity import FidelityResult
from spd_host.hookspecs import hookimpl
from spd_host.plugins import get_host, temporary_plugins
from tests.evals.toy_plugin import ToyPlugin

runner = CliRunner()


class CountConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    n_tokens: int = 10


class CountResult(EvalResult):
    headline_fields: ClassVar[tuple[str, ...]] = ("n_sites", "n_tokens")
    suite: Literal["count-sites"] = "count-sites"
    n_sites: int
    n_tokens: int


def _count(adapter: Any, config: CountConfig) -> CountResult:
    return CountResult(
        decomposition_id=adapter.decomposition_id,
        method=adapter.method.name,
        package_version="x",
        config=config.model_dump(),
        n_sites=len(adapter.sites),
        n_tokens=config.n_tokens,
    )


class SuitePlugin:
    @hookimpl
    def register_eval_suites(self, register: Callable[[Any], None]) -> None:
        register(EvalSuite("count-sites", "Counts sites (test suite).", CountConfig, _count))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    text = "the quick brown fox jumps over the lazy dog, and then it sleeps.\n" * 60
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture
def host():
    with temporary_plugins(
        ("toytc", ToyPlugin()), ("suites", SuitePlugin()), entry_points=False
    ) as h:
        yield h


def test_list_shows_builtin_and_plugin_suites(host) -> None:
    out = runner.invoke(app, ["eval", "list", "--json"])
    assert out.exit_code == 0, out.output
    names = [s["name"] for s in json.loads(out.stdout)]
    assert {"fidelity", "intruder", "detection", "fuzzing", "count-sites"} <= set(names)
    table = runner.invoke(app, ["eval", "list"])
    assert "count-sites" in table.stdout and "LLM" in table.stdout


def test_plugin_suite_runs_and_saves_versioned_json(host) -> None:
    out = runner.invoke(app, ["eval", "run", "count-sites", "toytc:demo", "--n-tokens", "7"])
    assert out.exit_code == 0, out.output
    assert "toytc:demo" in out.stdout
    path = result_path(get_host().parse_id("toytc:demo").storage_key, "count-sites")
    saved = load_result(path, CountResult)
    assert saved.n_sites == 2 and saved.n_tokens == 7 and saved.schema_version == 1


def test_fidelity_cli_two_ids_one_table_json_and_wandb(host, corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    # the second decomposition records seq_len 16; the first records none (default 128 would not
    # even fit the toy's 32 positions): both must be evaluated on the same 16-token sequences
    other = "toytc:" + str(tmp_path / "seq16")
    (tmp_path / "seq16").mkdir()
    args = ["eval", "fidelity", "toytc:demo", other, "--dataset", str(corpus)]
    args += ["--n-tokens", "256", "--batch-size", "4", "--variant", "relu", "--no-per-site"]
    table = runner.invoke(app, [*args, "--wandb", "--wandb-project", "p"])
    assert table.exit_code == 0, table.output
    assert "fidelity: 2 decomposition(s)" in table.stdout
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert runs, "no offline wandb run was written"
    (logged,) = list(runs[0].rglob("comparison_*.table.json"))  # the comparison table, as logged
    tab = json.loads(logged.read_text())
    assert "CE score" in tab["columns"]
    assert [r[tab["columns"].index("decomposition")] for r in tab["data"]] == ["toytc:demo", other]
    out = runner.invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [r["decomposition_id"] for r in doc["results"]] == ["toytc:demo", other]
    for raw in ("toytc:demo", other):
        path = result_path(get_host().parse_id(raw).storage_key, "fidelity")
        res = load_result(path, FidelityResult)
        assert isinstance(res, FidelityResult)
        assert res.variants == ["relu"] and res.n_tokens == 256 and res.seq_len == 16
        assert res.dataset.endswith("(heldout)")
        row = res.loss_row()
        assert row.ce_ablated > row.ce_spliced  # splicing beats zero-ablation on the toy
        assert res.config["n_tokens"] == 256 and res.package_version


def test_unknown_suite_and_unspliceable_errors_are_clean(host) -> None:
    out = runner.invoke(app, ["eval", "run", "nope", "toytc:demo"])
    assert out.exit_code != 0
    assert "unknown eval suite" in out.output and "Traceback" not in out.output


def test_wandb_run_flags_and_keys_without_spaces(host, corpus, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    args = ["eval", "fidelity", "toytc:demo", "--dataset", str(corpus), "--n-tokens", "128"]
    args += ["--seq-len", "16"]
    args += ["--batch-size", "4", "--variant", "relu", "--no-per-site", "--wandb"]
    args += ["--wandb-name", "my-run", "--wandb-group", "grp", "--wandb-tags", "a"]
    args += ["--wandb-tags", "b"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # offline runs keep everything in the run's record log (protobuf): keys appear verbatim
    # (wandb keeps its first settings per process, so find the run from what the CLI printed)
    where = " ".join(result.output.split()).split("to wandb: ")[1].split()[0]
    (log,) = list(Path(where).parent.rglob("run-*.wandb"))
    deadline = time.monotonic() + 30  # wandb's service process may still be writing it
    while b"CE_score" not in (data := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"fidelity/toytc:demo/relu/CE_score" in data and b"relu/CE score" not in data
    for value in (b"my-run", b"grp"):
        assert value in data
    # per-scope reconstruction metrics and the resolved dataset are logged too
    assert b"/scope/" in data and b"/mse" in data and b"/cosine_similarity" in data
    assert b"(heldout)" in data

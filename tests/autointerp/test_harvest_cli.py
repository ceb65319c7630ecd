"""End to end over a real (toy) harvest: the bridge, `spd-host autointerp` and `spd-host show`."""

from __future__ import annotations

import pytest
from llm_server import LLMServer
from typer.testing import CliRunner

from spd_host.autointerp.api import labels_db_path, load_labels
from spd_host.autointerp.bridge import HarvestEvidence, evidence_from_harvest
from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from spd_host.plugins import temporary_plugins
from tests.harvest import toy_plugin

ID = "toy:demo"


def test_bridge_decodes_harvest_evidence(toy_harvest: HarvestRepo) -> None:
    key = max(toy_harvest.summary(), key=lambda s: s.firing_count).key
    ev = evidence_from_harvest(toy_harvest, key)
    detail = toy_harvest.component(key)
    assert ev.method_name == "toy" and ev.method_description == toy_plugin.METHOD.description
    assert ev.location == f"{key[0]}.mlp_in" and ev.firing_count == detail.firing_count
    assert ev.firing_density == pytest.approx(detail.firing_count / toy_harvest.n_tokens)
    # token ids decode through the toy tokenizer: id i -> "t{i} "
    stats = toy_harvest.token_stats(key, "input", top=10)
    assert [(t.token, t.value) for t in ev.input_tokens.pmi] == [
        (f"t{s.token} ", s.value) for s in stats.top_pmi
    ]
    first = detail.top_examples[0]
    assert ev.examples[0].tokens == tuple(f"t{t} " for t in first.tokens)
    assert ev.examples[0].activations == pytest.approx(first.activations["act"])  # primary type
    assert ev.examples[0].firings[first.centre]
    assert len(ev.examples) == len(detail.top_examples) + len(detail.reservoir_examples)


def test_cli_offline_baseline_end_to_end_and_resume(toy_harvest: HarvestRepo) -> None:
    runner = CliRunner()
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        result = runner.invoke(app, ["autointerp", ID, "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "BASELINE" in result.output
        firing = {s.key for s in toy_harvest.summary() if s.firing_count >= 1}
        labels = load_labels(ID)
        assert {r.component_key for r in labels} == firing
        assert all(r.is_baseline and (r.label or "").startswith("baseline: ") for r in labels)
        assert all(r.provider == "offline" and r.cost_usd == 0 for r in labels)

        again = runner.invoke(app, ["autointerp", ID, "--json"])
        assert again.exit_code == 0, again.output
        assert (
            '"n_labelled": 0' in again.output
            and f'"n_already_labelled": {len(firing)}' in again.output
        )

        key = sorted(firing)[0]
        shown = runner.invoke(app, ["show", ID, key])
        assert shown.exit_code == 0, shown.output
        assert "BASELINE" in shown.output and "evidence" in shown.output and "<<" in shown.output
        assert labels_db_path(ID).exists()


def test_cli_against_openai_compatible_server(toy_harvest: HarvestRepo) -> None:
    runner = CliRunner()
    with temporary_plugins(("toy", toy_plugin), entry_points=False), LLMServer() as server:
        result = runner.invoke(
            app,
            [
                "autointerp",
                ID,
                "--provider",
                "openai-compatible",
                "--model",
                "local-model",
                "--base-url",
                server.openai_url,
                "--strategy",
                "dual_view",
                "--limit",
                "3",
                "--no-progress",
            ],
        )
        assert result.exit_code == 0, result.output
    assert len(server.requests) == 3
    assert "what comes next" in server.requests[0].prompt  # dual view's second example block
    labels = load_labels(ID, strategy="dual_view")
    assert len(labels) == 3 and not any(r.is_baseline for r in labels)


def test_unknown_provider_is_a_clear_error(toy_harvest: HarvestRepo) -> None:
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        result = CliRunner().invoke(app, ["autointerp", ID, "--provider", "nope"])
    assert result.exit_code == 1
    assert "unknown LLM provider 'nope'" in result.output and "offline" in result.output


def test_evidence_builder_reuses_adapter(toy_harvest: HarvestRepo) -> None:
    with temporary_plugins(("toy", toy_plugin), entry_points=False):
        build = HarvestEvidence(toy_harvest)
        keys = build.keys()
        assert len(keys) == 12
        assert build(keys[0]).component_key == keys[0]

"""The README's first command, end to end on the bundled demo (small settings)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from spd_host.autointerp import load_labels
from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from spd_host.ids import parse_decomposition_id
from spd_host.paths import results_dir


def test_demo_runs_the_whole_pipeline_offline(_isolated_home: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--n-tokens", "1024", "--eval-tokens", "512"])
    assert result.exit_code == 0, result.output

    repo = HarvestRepo.open("transcoder:demo")
    assert repo.n_tokens >= 1024
    fired = [c for c in repo.summary() if c.firing_count > 0]
    assert fired

    labels = load_labels("transcoder:demo")
    assert {lab.component_key for lab in labels} == {c.key for c in fired}
    assert all(lab.label.startswith("baseline: ") for lab in labels)

    for did in ("transcoder:demo", "clt:demo", "spd:demo"):
        key = parse_decomposition_id(did, methods=["transcoder", "clt", "spd"]).storage_key
        doc = json.loads((results_dir(key) / "evals" / "fidelity.json").read_text())
        first = doc["loss"][0]
        assert first["scope"] == "all"
        # spliced CE sits between clean and zero-ablated, far from the latter
        assert first["ce_clean"] < first["ce_spliced"] < first["ce_ablated"]
        assert first["ce_loss_score"] > 0.5, (did, first)
    assert "fidelity" in result.output and "spd-host show transcoder:demo" in result.output

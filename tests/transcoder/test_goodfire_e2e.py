"""One Goodfire transcoder set and one Goodfire CLT (nn_decompositions checkpoints, random
weights, on the bundled demo model) through `spd-host harvest`, `eval fidelity` and offline
`autointerp`, end to end via the CLI (tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spd_host.autointerp.api import load_labels
from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from tests.transcoder.goodfire_files import write_clt, write_harvest_config, write_transcoder

D_MODEL, N_LAYERS = 128, 4  # the demo model (GPT-2 layout, h.{i}.mlp)


def goodfire_ids(tmp_path: Path) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        write_transcoder(
            tmp_path / f"tc{i}", gen=gen, input_size=D_MODEL, output_size=D_MODEL,
            dict_size=64, top_k=4,
        )  # fmt: skip
    tc = write_harvest_config(
        tmp_path / "tc.yaml", "demo", {f"h.{i}.mlp": f"tc{i}" for i in range(2)}
    )
    write_clt(
        tmp_path / "clt", gen=gen, layers=list(range(N_LAYERS)), input_size=D_MODEL,
        output_size=D_MODEL, dict_size=32, top_k=4,
    )  # fmt: skip
    clt = write_harvest_config(tmp_path / "clt.yaml", "demo", "clt")
    return [f"transcoder:{tc}", f"clt:{clt}"]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["transcoder", "clt"])
def test_harvest_eval_autointerp(tmp_path: Path, which: int) -> None:
    did = goodfire_ids(tmp_path)[which]
    runner = CliRunner()
    common = ["--dataset", "demo", "--batch-size", "4", "--seq-len", "32"]
    harvest = runner.invoke(app, ["harvest", did, "--n-tokens", "512", *common, "--json"])
    assert harvest.exit_code == 0, harvest.output
    repo = HarvestRepo.open(did)
    summary = repo.summary()
    n_sites = 2 if which == 0 else N_LAYERS
    assert {c.site for c in summary} == {f"layer_{i}" for i in range(n_sites)}
    fired = [c for c in summary if c.firing_count > 0]
    assert fired
    # BatchTopK: exactly k per token on average, per site, over each 4 x 32 batch
    per_site: dict[str, int] = {}
    for c in summary:
        per_site[c.site] = per_site.get(c.site, 0) + c.firing_count
    assert all(n == 4 * 512 for n in per_site.values()), per_site

    fid = runner.invoke(
        app, ["eval", "fidelity", did, "--n-tokens", "128", *common, "--no-per-site", "--json"]
    )
    assert fid.exit_code == 0, fid.output
    doc = json.loads(fid.stdout)
    row = doc[0] if isinstance(doc, list) else doc
    text = json.dumps(row)
    assert "ce_spliced" in text and "reconstruction" in text

    labelled = runner.invoke(
        app, ["autointerp", did, "--provider", "offline", "--limit", "3", "--no-progress"]
    )
    assert labelled.exit_code == 0, labelled.output
    labels = load_labels(did)
    assert len(labels) == 3 and all(r.is_baseline for r in labels)

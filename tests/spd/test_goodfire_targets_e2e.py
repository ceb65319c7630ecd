"""harvest -> autointerp (offline baseline) -> eval fidelity on an SPD run over LlamaSimpleMLP.

Through the CLI, as a user would run it, on a tiny pretrain run in Goodfire's layout and a text
corpus written in the run's own (word-level) vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from tests.spd import goodfire_pretrain as gp
from tests.spd.test_goodfire_targets import PATTERNS, _write_spd_run


def _corpus(path: Path, n_words: int = 1500) -> Path:
    rng = random.Random(0)
    lines = [
        " ".join(f"w{rng.randrange(2, gp.VOCAB)}" for _ in range(rng.randrange(8, 30)))
        for _ in range(n_words // 15)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_harvest_autointerp_and_fidelity_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pretrain" / "run"
    gp.write_pretrain_run(out, gp.LLAMA_SIMPLE_MLP)
    spd = tmp_path / "spd"
    _write_spd_run(
        spd,
        gp.LLAMA_SIMPLE_MLP,
        str(out / "checkpoints" / "model_step_100.pt"),
        PATTERNS["LlamaSimpleMLP"],
    )
    did = f"spd:{spd}"
    corpus = _corpus(tmp_path / "corpus.txt")
    runner = CliRunner()

    harvest = runner.invoke(
        app,
        [
            "harvest",
            "run",
            did,
            "--dataset",
            str(corpus),
            "--n-tokens",
            "384",
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--examples-per-component",
            "4",
            "--json",
        ],
    )
    assert harvest.exit_code == 0, harvest.output
    repo = HarvestRepo.open(did)
    summary = repo.summary()
    assert {c.site for c in summary} == {"0.mlp.up", "1.mlp.up", "1.mlp.down", "0.attn.k"}
    assert len(summary) == 5 + 5 + 4 + 3 and repo.n_tokens == 384
    assert any(c.firing_count > 0 for c in summary)

    labels = runner.invoke(app, ["autointerp", did, "--provider", "offline", "--json"])
    assert labels.exit_code == 0, labels.output
    report = json.loads(labels.stdout)
    assert report["baseline"] is True and report["n_components"] == 17
    assert report["n_labelled"] == 17 and report["n_failed"] == 0

    fidelity = runner.invoke(
        app,
        [
            "eval",
            "fidelity",
            did,
            "--dataset",
            str(corpus),
            "--n-tokens",
            "128",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--json",
        ],
    )
    assert fidelity.exit_code == 0, fidelity.output
    (result,) = json.loads(fidelity.stdout)["results"]
    assert result["decomposition_id"] == did
    from spd_adapters.spd.splice import DETERMINISTIC_VARIANTS

    assert result["variants"] == list(DETERMINISTIC_VARIANTS)  # the deterministic ones by default
    assert result["n_tokens"] == 128 and result["harvest_run"] == repo.run
    for row in result["loss"]:
        assert 0 < row["ce_clean"] < 10 and row["n_predictions"] == 120

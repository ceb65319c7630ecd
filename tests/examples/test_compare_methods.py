"""examples/compare_methods.py end to end on the three demo methods (fast settings, offline
provider and judge, fuzzing only: detection is the same code path and slower): one table row per method, and every number it prints is the one stored
under SPD_HOST_HOME (CE score re-derived from the stored losses by its formula)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import spd_host

from ._run import run_example

IDS = ["transcoder:demo", "clt:demo", "spd:demo"]
COLUMNS = ["CE score", "KL score", "EV", "L0", "alive", "labels", "fuzzing"]
N_COMPONENTS, N_TRIALS, N_LABELS = 2, 1, 20


def test_compare_methods_table_matches_stored_results(tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = [
        *IDS,
        "--harvest-tokens", "1024",
        "--eval-tokens", "256",
        "--label-limit", str(N_LABELS),
        "--judge-suites", "fuzzing",
        "--judge-components", str(N_COMPONENTS),
        "--judge-trials", str(N_TRIALS),
    ]  # fmt: skip
    proc = run_example("compare_methods.py", args, home)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("decomposition"))
    assert lines[header].split()[:2] == ["decomposition", "variant"]
    rows = {line.split()[0]: line.split() for line in lines[header + 2 : header + 2 + len(IDS)]}
    assert sorted(rows) == sorted(IDS)
    assert "judge: offline/baseline-judge (BASELINE)" in proc.stdout
    assert "note: offline BASELINE judge" in proc.stdout

    for did in IDS:
        cells = dict(zip(["decomposition", "variant", *COLUMNS], rows[did], strict=True))
        evals = home / "results" / spd_host.get_host().parse_id(did).storage_key / "evals"
        fidelity = json.loads((evals / "fidelity.json").read_text())
        assert fidelity["decomposition_id"] == did
        assert cells["variant"] == fidelity["variants"][0]
        loss = next(r for r in fidelity["loss"] if r["scope"] == "all")
        ce_score = (loss["ce_ablated"] - loss["ce_spliced"]) / (
            loss["ce_ablated"] - loss["ce_clean"]
        )
        assert float(cells["CE score"]) == round(ce_score, 3)
        assert 0.5 < ce_score <= 1.0  # every demo recovers most of the loss
        assert float(cells["alive"]) == round(fidelity["alive_fraction"], 3)

        assert not (evals / "detection.json").exists()  # only the suites asked for run
        for suite in ("fuzzing",):
            judged = json.loads((evals / f"{suite}.json").read_text())
            assert judged["baseline"] is True and judged["chance"] == 0.5
            assert judged["n_trials_ok"] == N_COMPONENTS * N_TRIALS
            assert float(cells[suite]) == round(judged["score"], 3)
            assert 0.0 <= judged["score"] <= 1.0

        db = evals.parent / "autointerp" / "labels.db"
        with sqlite3.connect(db) as con:
            (n_labels,) = con.execute(
                "SELECT COUNT(DISTINCT component_key) FROM labels WHERE status = 'ok'"
            ).fetchone()
        assert int(cells["labels"]) == n_labels == N_LABELS

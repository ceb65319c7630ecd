"""Compare two finished harvests statistic by statistic."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_results(a: Path, b: Path, *, reservoir: bool) -> None:
    """Every stored array bit-identical; component rows and top example arrays identical.

    Reservoir arrays are compared exactly when ``reservoir`` (same seed, same split), else only
    their number per component (a merge draws a different, equally uniform, sample).
    """
    sa, sb = load_file(str(a / "stats.safetensors")), load_file(str(b / "stats.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ca, cb = sqlite3.connect(a / "harvest.db"), sqlite3.connect(b / "harvest.db")
    q = "SELECT * FROM components ORDER BY gidx"
    assert ca.execute(q).fetchall() == cb.execute(q).fetchall()
    ea, eb = load_file(str(a / "examples.safetensors")), load_file(str(b / "examples.safetensors"))
    assert ea.keys() == eb.keys()
    for k in ea:
        if reservoir or k.startswith("top_"):
            assert ea[k].dtype == eb[k].dtype and torch.equal(ea[k], eb[k]), k
    # a merge draws a different (equally uniform) reservoir: the same number per component
    assert torch.equal(ea["reservoir_indptr"], eb["reservoir_indptr"])

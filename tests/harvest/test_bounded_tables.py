"""Bounded (component, token) tables: every count within the recorded bound of brute force,
and a resumed bounded harvest identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from spd_host.harvest import run_harvest
from tests.harvest import toy_plugin
from tests.harvest.compare import assert_same_results
from tests.harvest.conftest import SEQ, harvest_toy, toy_config
from tests.harvest.reference import build_reference, input_pair_counts


def _bounded(**kw: object):  # type: ignore[no-untyped-def]
    return toy_config(dense_table_bytes=0, token_table_max_pairs=40, **kw)


def test_bounded_input_table_is_within_its_bound(toy_host: object, tmp_path: Path) -> None:
    repo = harvest_toy(tmp_path / "bounded", _bounded())
    bound = repo.meta["input_prune_bound"]
    assert bound > 0, "the cap should have pruned"
    exact = input_pair_counts(build_reference(50, 4, SEQ))
    st = load_file(str(repo.path / "stats.safetensors"))
    indptr, cols, vals = st["input_indptr"], st["input_cols"], st["input_values"]
    stored = {}
    for c in range(indptr.shape[0] - 1):
        for t, v in zip(
            cols[indptr[c] : indptr[c + 1]].tolist(),
            vals[indptr[c] : indptr[c + 1]].tolist(),
            strict=True,
        ):
            stored[(c, t)] = v
    assert len(stored) < len(exact)  # some pairs were dropped
    for pair, n in exact.items():
        assert 0 <= n - stored.get(pair, 0) <= bound, pair
    assert set(stored) <= set(exact)
    key = "0.mlp:0"
    assert repo.token_stats(key, "input").approximation_bound == bound
    # output masses: under-estimates within the prune bound plus the top-k bound
    out_bound = repo.meta["output_prune_bound"]
    assert out_bound > 0
    assert repo.token_stats(key, "output").approximation_bound >= out_bound


def test_bounded_harvest_resumes_identically(toy_host: object, tmp_path: Path) -> None:
    cfg = _bounded()
    full = harvest_toy(tmp_path / "full", cfg).path
    out = tmp_path / "resumed"
    source = toy_plugin.toy_source(cfg.batch_size, SEQ)
    for stop in (7, 20):  # stops on both sides of a prune (every 16 batches)
        assert (
            run_harvest("toy:demo", cfg, out=out, batches=source, stop_after=stop, progress=False)
            is None
        )
    run_harvest("toy:demo", cfg, out=out, batches=source, progress=False)
    assert_same_results(full, out, reservoir=True)
    assert torch.equal(
        load_file(str(full / "stats.safetensors"))["input_values"],
        load_file(str(out / "stats.safetensors"))["input_values"],
    )

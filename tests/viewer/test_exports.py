# ruff: noqa: N815
"""Exports read back by readers written here from the published schemas, the index cache against
brute force over ``HarvestRepo.summary()``, decoder logits against a dense reference, CLI errors.

Neuronpedia: ``apps/webapp/prisma/schema.prisma`` (models ``Neuron``, ``Activation``,
``Explanation``) in hijohnnylin/neuronpedia. circuit-tracer: ``frontend/feature_models.py`` and
the byte-range logic of ``frontend/assets/feature_examples/init-feature-examples.js``.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo

pytestmark = pytest.mark.slow


# -- readers from the published schemas ----------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CTExample(_Strict):  # circuit_tracer/frontend/feature_models.py: Example
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class CTQuantile(_Strict):  # ExamplesQuantile
    quantile_name: str
    examples: list[CTExample]


class CTFeature(_Strict):  # Model
    transcoder_id: str
    index: int
    examples_quantiles: list[CTQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


class NPActivation(BaseModel):  # prisma model Activation (the columns an upload fills)
    tokens: list[str]
    values: list[float]
    maxValue: float
    maxValueTokenIndex: int
    minValue: float
    binMin: float | None
    binMax: float | None
    binContains: float | None
    qualifyingTokenIndex: int | None
    dataIndex: str | None


class NPExplanation(BaseModel):  # prisma model Explanation
    description: str
    explanationModelName: str | None
    typeName: str | None


class NPNeuron(BaseModel):  # prisma model Neuron
    modelId: str
    layer: str
    index: str
    maxActApprox: float | None
    frac_nonzero: float
    pos_str: list[str]
    pos_values: list[float]
    neg_str: list[str]
    neg_values: list[float]
    freq_hist_data_bar_heights: list[float]
    freq_hist_data_bar_values: list[float]
    logits_hist_data_bar_heights: list[float]
    logits_hist_data_bar_values: list[float]
    activations: list[NPActivation]
    explanations: list[NPExplanation]


def cantor_unpair(z: int) -> tuple[int, int]:
    """The frontend's ``util.cantorUnpair`` (written from the pairing's definition)."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    f = z - w * (w + 1) // 2
    return w - f, f


def ct_load(features: Path, feature_id: int) -> dict[str, Any]:
    """What the frontend does: read index.json.gz, then the HTTP byte range
    ``bytes=offsets[f]-offsets[f+1]`` (inclusive end) of that layer's .bin, and decode it."""
    index = json.loads(gzip.decompress((features / "index.json.gz").read_bytes()))
    layer, f = cantor_unpair(feature_id)
    entry = index[layer]
    start, end = entry["offsets"][f], entry["offsets"][f + 1]
    with (features / entry["filename"]).open("rb") as fh:
        fh.seek(start)
        blob = fh.read(end - start + 1)  # inclusive range: may carry the next member's first byte
    d = zlib.decompressobj(wbits=31)
    return dict(json.loads(d.decompress(blob)))


# -- tests ---------------------------------------------------------------------------------------
def test_circuit_tracer_files_round_trip(home: Path, viewer: Any, tmp_path: Path) -> None:
    from spd_host.viewer.exports import cantor_pair, export_circuit_tracer

    src = viewer.sources[0]
    path = export_circuit_tracer(src, tmp_path)
    repo = HarvestRepo(src.repo.path)
    index = json.loads(gzip.decompress(path.read_bytes()))
    assert [e["filename"] for e in index] == [f"{s}.bin" for s in repo.layout.names]
    for layer, (site, n) in enumerate(zip(repo.layout.names, repo.layout.sizes, strict=True)):
        offs = index[layer]["offsets"]
        assert len(offs) == n + 1 and offs[-1] == (path.parent / f"{site}.bin").stat().st_size
    P = repo.layout.act_types[0]
    summary = repo.summary()
    alive = [s for s in summary if s.firing_count][:5] + [s for s in summary if not s.firing_count][
        :1
    ]
    logits = _dense_logits(src)
    for s in alive:
        layer = repo.layout.names.index(s.site)
        fid = cantor_pair(layer, s.index)
        assert cantor_unpair(fid) == (layer, s.index)
        feat = CTFeature.model_validate(ct_load(path.parent, fid))
        d = repo.component(s.key)
        assert feat.index == s.index
        assert feat.activation_frequency == pytest.approx(d.density)
        assert feat.act_max == pytest.approx(d.max_firing[P] or 0.0)
        assert feat.histogram == [float(c) for c in d.histogram_counts]
        top = feat.examples_quantiles[0].examples
        assert [e.tokens for e in top] == [
            [repo.tokenizer.decode([t]) for t in ex.tokens] for ex in d.top_examples
        ]
        assert [e.train_token_ind for e in top] == [ex.centre for ex in d.top_examples]
        for e, ex in zip(top, d.top_examples, strict=True):
            assert e.tokens_acts_list == pytest.approx(ex.activations[P])
        n_q = sum(len(q.examples) for q in feat.examples_quantiles[1:])
        assert n_q == len(d.reservoir_examples)
        ids, _ = logits[s.site]
        assert feat.top_logits == [repo.tokenizer.decode([int(t)]) for t in ids[s.index]]


def _dense_logits(src: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference: the full ``W_dec @ W_U^T`` per site, top 10 token ids (and bottom)."""
    adapter = src.adapter
    W_U = adapter.load_base_model().get_output_embeddings().weight.detach().float()
    out = {}
    for site in src.repo.layout.names:
        L = adapter.dictionary(site).W_dec.detach().float() @ W_U.T
        out[site] = (
            torch.topk(L, 10, dim=1).indices,
            torch.topk(L, 10, dim=1, largest=False).indices,
        )
    return out


def test_logits_equal_dense_reference(home: Path, viewer: Any) -> None:
    from spd_host.viewer.logits import LogitTable, logits_path

    src = viewer.sources[0]
    assert logits_path(src).exists()  # written by `spd-host export logits` in the fixture
    table = LogitTable.load(src)
    assert table is not None
    ref = _dense_logits(src)
    for site in src.repo.layout.names:
        for i in (0, 7, 100):
            row = table.row(site, i)
            assert row is not None
            assert [t for t, _ in row["top"]] == ref[site][0][i].tolist()
            assert [t for t, _ in row["bottom"]] == ref[site][1][i].tolist()
    assert LogitTable.load(viewer.sources[1]) is None  # SPD: no fixed decoder direction


def test_neuronpedia_round_trip(home: Path, viewer: Any, tmp_path: Path) -> None:
    from spd_host.viewer.exports import export_neuronpedia

    src = viewer.sources[0]
    repo = HarvestRepo(src.repo.path)
    P = repo.layout.act_types[0]
    labelled = sorted({r.component_key for r in src.label_records() if r.status == "ok"})[:3]
    assert export_neuronpedia(src, tmp_path, labelled) == 3
    for key in labelled:
        site, idx = key.split(":")
        f = NPNeuron.model_validate_json((tmp_path / site / f"{idx}.json").read_text())
        d = repo.component(key)
        assert (f.layer, f.index) == (site, idx)
        assert f.frac_nonzero == pytest.approx(d.density)
        assert f.maxActApprox == pytest.approx(d.max_firing[P])
        assert len(f.freq_hist_data_bar_heights) == len(f.freq_hist_data_bar_values)
        tops = [a for a in f.activations if a.binMin == -1]
        assert len(tops) == len(d.top_examples)
        for a, ex in zip(tops, d.top_examples, strict=True):
            assert a.values == pytest.approx(ex.activations[P])
            assert a.maxValue == pytest.approx(max(ex.activations[P]))
            assert a.qualifyingTokenIndex == ex.centre
            assert a.tokens == [repo.tokenizer.decode([t]) for t in ex.tokens]
        binned = [a for a in f.activations if a.binMin != -1]
        assert len(binned) == len(d.reservoir_examples)
        assert all(
            a.binMin is not None and a.binMax is not None and a.binMin <= a.binMax for a in binned
        )
        labels = {r.label for r in src.label_records(key) if r.status == "ok"}
        assert {e.description for e in f.explanations} == labels
        assert len(f.pos_str) == 10 and f.pos_values == sorted(f.pos_values, reverse=True)


def test_index_queries_equal_brute_force(home: Path, viewer: Any) -> None:
    from spd_host.viewer.index import IndexQuery

    index = viewer.indexes[1]  # SPD demo
    summary = HarvestRepo(viewer.sources[1].repo.path).summary()
    prim = viewer.sources[1].primary
    g = {s.key: i for i, s in enumerate(summary)}
    for q, keep, sort_key in (
        (IndexQuery(sort="max", desc=True, page=2, per_page=30), lambda s: True,
         lambda s: (s.max_firing[prim] is None, -(s.max_firing[prim] or 0), -g[s.key])),
        (IndexQuery(sort="key", desc=False, site="2.mlp.down", alive="alive"),
         lambda s: s.site == "2.mlp.down" and s.firing_count > 0, lambda s: g[s.key]),
        (IndexQuery(sort="density", desc=False, dmin=0.01, dmax=0.2, alive="all"),
         lambda s: 0.01 <= s.density <= 0.2, lambda s: (s.density, g[s.key])),
        (IndexQuery(sort="mean", desc=False, page=3, per_page=100), lambda s: True,
         lambda s: (s.mean_firing[prim] is None, s.mean_firing[prim] or 0, g[s.key])),
    ):  # fmt: skip
        rows, total = index.query(q)
        ref = sorted((s for s in summary if keep(s)), key=sort_key)
        assert total == len(ref)
        lo = (q.page - 1) * q.per_page
        assert [r["key"] for r in rows] == [s.key for s in ref[lo : lo + q.per_page]]
    hist = index.density_histogram()
    for site, h in hist["sites"].items():
        assert sum(h["counts"]) + h["dead"] == sum(1 for s in summary if s.site == site)
        assert h["dead"] == sum(1 for s in summary if s.site == site and s.firing_count == 0)


def test_cli_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app, ["dashboard", "transcoder:demo", "--out", str(tmp_path), "--components", "layer_9:1"]
    )
    assert r.exit_code == 1 and "components not in the harvest: layer_9:1" in " ".join(
        r.output.split()
    )
    r = CliRunner().invoke(
        app, ["dashboard", "transcoder:demo", "--out", str(tmp_path), "--search", "zzqqxx"]
    )
    assert r.exit_code == 1 and "no component matches search 'zzqqxx'" in " ".join(r.output.split())
    r = CliRunner().invoke(
        app,
        [
            "export",
            "neuronpedia",
            "transcoder:demo",
            "--out",
            str(tmp_path / "np"),
            "--components",
            "layer_0:1,layer_0:2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "np" / "layer_0").iterdir()) == ["1.json", "2.json"]


def test_index_refreshes_labels_and_searches_tokens(
    demo_home: Path, _isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A label written after the cache was built is found on the next start; top tokens are
    searchable (on a copy of the demo home, so other tests see the original)."""
    import shutil

    from spd_host.autointerp.store import LabelRecord, LabelStore, now_iso
    from spd_host.plugins import reset_host
    from spd_host.viewer.index import ComponentIndex, IndexQuery
    from spd_host.viewer.source import DecompositionSource

    home = tmp_path / "home"
    shutil.copytree(demo_home / "results", home / "results")
    monkeypatch.setenv("SPD_HOST_HOME", str(home))
    reset_host()
    src = DecompositionSource("transcoder:demo")
    index = ComponentIndex(src).ensure(background_tokens=False)
    summary = src.repo.summary()
    labelled = {r.component_key for r in src.label_records()}
    tok = src.repo.tokenizer

    def words(k: str) -> list[str]:
        top = src.repo.token_stats(k, "input", top=5).top_pmi
        return [w for s in top for w in tok.decode([s.token]).split() if w.isalnum()]

    key = next(s.key for s in summary if s.firing_count and s.key not in labelled and words(s.key))
    assert index.query(IndexQuery(q="zebracrossing"))[1] == 0
    with LabelStore(src.labels_path) as store:
        t = now_iso()
        store.write(
            LabelRecord(
                harvest_id=src.repo.run, component_key=key, strategy="manual", model="person",
                provider="test", decomposition_id="transcoder:demo", status="ok",
                is_baseline=False, label="zebracrossing detector", confidence=None,
                reasoning=None, raw_response=None, system_prompt="", prompt="", error=None,
                cost_usd=0.0, input_tokens=0, output_tokens=0, attempts=1, started_at=t,
                finished_at=t,
            )
        )  # fmt: skip
    index = ComponentIndex(DecompositionSource("transcoder:demo")).ensure(background_tokens=False)
    rows, total = index.query(IndexQuery(q="zebra"))
    assert total == 1 and rows[0]["key"] == key and rows[0]["label_model"] == "test/person"
    # a top input token of that component (by PMI, from token_stats) finds it too
    rows, _ = index.query(IndexQuery(q=words(key)[0], per_page=1000))
    assert key in {r["key"] for r in rows}


def test_serve_command_binds_loopback_and_answers(home: Path) -> None:
    """The real `spd-host serve` process: loopback by default, a free port with --port 0."""
    import os
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "SPD_HOST_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spd_host.cli.app", "serve", "transcoder:demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            assert line, "serve exited early"
            m = re.search(r"http://(127\.0\.0\.1):(\d+)/", line)
            url = m.group(0) if m else None
        assert url is not None
        for _ in range(200):
            try:
                with urllib.request.urlopen(url + "d/0/?sort=max", timeout=10) as r:
                    assert r.status == 200 and "layer_0" in r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("serve did not answer")
    finally:
        proc.terminate()
        proc.wait(timeout=20)

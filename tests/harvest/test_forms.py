"""The sparse and top-k HarvestBatch forms, table layouts, batch size and device give
bit-identical harvests (the dense form is checked against brute force in test_reference)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spd_host.adapter import HarvestOptions
from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
from tests.harvest import toy_plugin
from tests.harvest.compare import assert_same_results
from tests.harvest.conftest import SEQ, harvest_toy, toy_config


def _harvest(out: Path, monkeypatch: pytest.MonkeyPatch, form: str, **cfg: object) -> Path:
    monkeypatch.setattr(toy_plugin, "FORM", form)
    harvest_toy(out, toy_config(**cfg))
    return out


def test_sparse_and_topk_forms_equal_the_dense_form(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toy_plugin, "FORM", "topk")
    opts = HarvestOptions(sparse=True, next_token_top_k=5)
    b = toy_plugin.toy_harvest_fn(0.0, opts)(toy_plugin.toy_batch(0, 4, SEQ))
    assert set(b.sparse) == {"0.mlp", "1.mlp"} and not b.firings  # the forms under test
    assert b.next_token_topk is not None and b.next_token_logits is None
    assert b.next_token_topk.values.shape == (4, SEQ, 8)
    dense = _harvest(tmp_path / "masked", monkeypatch, "masked")
    sparse = _harvest(tmp_path / "sparse", monkeypatch, "sparse")
    topk = _harvest(tmp_path / "topk", monkeypatch, "topk")
    assert_same_results(dense, sparse, reservoir=True)
    assert_same_results(dense, topk, reservoir=True)
    # and the forms were really used: the masked form differs from the original dense one
    # only where `pre` is non-zero off the firings (its all-position mean)
    plain = _harvest(tmp_path / "dense", monkeypatch, "dense")
    a, b = HarvestRepo(plain).summary(), HarvestRepo(dense).summary()
    assert [s.mean_firing for s in a] == [s.mean_firing for s in b]
    assert [s.mean_all["pre"] for s in a] != [s.mean_all["pre"] for s in b]


def test_dense_and_sparse_tables_give_identical_results(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = _harvest(tmp_path / "dense_tables", monkeypatch, "dense")
    sparse = _harvest(tmp_path / "sparse_tables", monkeypatch, "dense", dense_table_bytes=0)
    assert_same_results(dense, sparse, reservoir=True)


def _fixed_stream(batch_size: int) -> object:
    """The same token sequences whatever the batch size (the toy source's first 200)."""
    seqs = torch.cat([toy_plugin.toy_batch(g, 4, SEQ) for g in range(50)])

    def source(rank: int, world_size: int, start: int) -> Iterator[torch.Tensor]:
        i = rank + start * world_size
        while i * batch_size < seqs.shape[0]:
            yield seqs[i * batch_size : (i + 1) * batch_size]
            i += world_size

    return source


def test_batch_size_does_not_change_the_statistics(toy_host: object, tmp_path: Path) -> None:
    runs = []
    for bs in (4, 8):
        cfg = toy_config(batch_size=bs)
        out = tmp_path / f"bs{bs}"
        run_harvest("toy:demo", cfg, out=out, batches=_fixed_stream(bs), progress=False)  # type: ignore[arg-type]
        runs.append(out)
    # the reservoir is drawn per batch (a different, equally uniform sample); all else is equal
    assert_same_results(runs[0], runs[1], reservoir=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_cuda_harvest_is_bit_identical_to_cpu(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    cpu = _harvest(tmp_path / "cpu", monkeypatch, form)
    cuda = _harvest(tmp_path / "cuda", monkeypatch, form, device="cuda")
    assert_same_results(cpu, cuda, reservoir=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_resumes_on_cuda(toy_host: object, tmp_path: Path) -> None:
    cpu = harvest_toy(tmp_path / "cpu").path
    out = tmp_path / "moved"
    cfg = toy_config()
    source = toy_plugin.toy_source(cfg.batch_size, SEQ)
    assert (
        run_harvest("toy:demo", cfg, out=out, batches=source, stop_after=9, progress=False) is None
    )
    cuda_cfg = HarvestConfig(**{**cfg.model_dump(), "device": "cuda"})
    run_harvest("toy:demo", cuda_cfg, out=out, batches=source, progress=False)
    assert_same_results(cpu, out, reservoir=True)


def test_growing_banks_equal_reserved_banks(
    toy_host: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example-bank layout of non-CPU devices (grown geometrically, rows initialised when
    assigned) gives the same results as the CPU's reserved layout, resumed midway too."""
    from spd_host.harvest.examples import ExampleBank

    reserved = _harvest(tmp_path / "reserved", monkeypatch, "sparse")
    monkeypatch.setattr(ExampleBank, "_reserve", lambda self: 0)
    grown = tmp_path / "grown"
    cfg = toy_config()
    source = toy_plugin.toy_source(cfg.batch_size, SEQ)
    monkeypatch.setattr(toy_plugin, "FORM", "sparse")
    assert (
        run_harvest("toy:demo", cfg, out=grown, batches=source, stop_after=7, progress=False)
        is None
    )
    run_harvest("toy:demo", cfg, out=grown, batches=source, progress=False)
    assert_same_results(reserved, grown, reservoir=True)

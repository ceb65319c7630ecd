"""The streaming safetensors writer against the safetensors library's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spd_host.harvest.tensor_file import Lazy, save_tensors


def test_every_dtype_and_shape_reads_back_identically(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "i32": torch.randint(-100, 100, (2, 2, 2), generator=g, dtype=torch.int32),
        "bool": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 17, dtype=torch.int32),
        "scalar": torch.tensor(5, dtype=torch.int64),
        "strided": torch.arange(20.0).view(4, 5).T,  # not contiguous: written in logical order
    }
    entries = dict(tensors)
    entries["lazy"] = Lazy(torch.float32, (2, 3), lambda: torch.full((2, 3), 1.5))
    save_tensors(entries, tmp_path / "a.safetensors")
    back = load_file(str(tmp_path / "a.safetensors"))
    assert set(back) == set(entries)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert torch.equal(back[k], t), k
    assert torch.equal(back["lazy"], torch.full((2, 3), 1.5))
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_slice("f32")[1:2], tensors["f32"][1:2])


def test_a_lazy_tensor_that_breaks_its_announcement_is_refused(tmp_path: Path) -> None:
    bad = {"x": Lazy(torch.float32, (2,), lambda: torch.zeros(3))}
    with pytest.raises(ValueError, match="announced"):
        save_tensors(bad, tmp_path / "b.safetensors")


def test_a_chunked_lazy_tensor_is_written_as_the_whole_one(tmp_path: Path) -> None:
    """First-dimension chunks written back to back must read back as the announced tensor,
    and chunks that do not add up to the announced shape are refused."""
    whole = torch.arange(7 * 3 * 2, dtype=torch.float32).view(7, 3, 2)
    parts = [whole[0:3], whole[3:3], whole[3:7]]  # an empty chunk too
    entries = {
        "chunked": Lazy(torch.float32, (7, 3, 2), lambda: whole, lambda: iter(parts)),
        "after": torch.tensor([1, 2, 3]),
        "empty": Lazy(
            torch.int32, (0, 4), lambda: torch.zeros(0, 4, dtype=torch.int32), lambda: iter([])
        ),
    }
    save_tensors(entries, tmp_path / "c.safetensors")
    back = load_file(tmp_path / "c.safetensors")
    assert torch.equal(back["chunked"], whole)
    assert back["after"].tolist() == [1, 2, 3] and back["empty"].shape == (0, 4)
    short = {"x": Lazy(torch.float32, (7, 3, 2), lambda: whole, lambda: iter(parts[:1]))}
    with pytest.raises(ValueError, match="chunks held 3 rows"):
        save_tensors(short, tmp_path / "d.safetensors")


def test_bank_fields_written_in_small_chunks_equal_the_whole_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_host: object
) -> None:
    """A real (toy) harvest's examples file: bank fields restored 5 slots at a time give the
    same bytes as restored in one piece, and the file holds what the banks hold."""
    from spd_host.harvest import store
    from tests.harvest.conftest import harvest_toy

    whole = harvest_toy(tmp_path / "whole")
    monkeypatch.setattr(store, "WRITE_CHUNK", 5)
    chunked = harvest_toy(tmp_path / "chunked")
    a = (whole.path / store.EXAMPLES_FILE).read_bytes()
    b = (chunked.path / store.EXAMPLES_FILE).read_bytes()
    assert a == b
    n_slots = load_file(chunked.path / store.EXAMPLES_FILE)["top_tokens"].shape[0]
    assert n_slots > 5 * 3  # several chunks per field really were written


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_stops_the_producer_and_raises() -> None:
    """The writer thread's error (here a full disk: every write to /dev/full is ENOSPC) comes
    back to the caller as the OSError, and the chunks behind it are not even built."""
    built = []

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(50):
            built.append(i)
            yield torch.full((1, 1 << 16), float(i))

    entries = {"x": Lazy(torch.float32, (50, 1 << 16), lambda: torch.zeros(0), chunks)}
    with pytest.raises(OSError, match="No space left"):
        save_tensors(entries, "/dev/full")
    assert len(built) < 50


def test_results_written_concurrently_are_the_bytes_of_a_sequential_write(tmp_path: Path) -> None:
    """The three result files built at once (stats and database on helper threads) hold the
    same bytes and rows as when written one after the other."""
    import sqlite3

    from spd_host.adapter import HarvestBatch, Site
    from spd_host.harvest import HarvestConfig
    from spd_host.harvest.accumulator import HarvestAccumulator, Layout
    from spd_host.harvest.store import DB_FILE, EXAMPLES_FILE, STATS_FILE, write_results

    sites = [Site(name="s", n_components=25, reads_from="0.mlp_in", writes_to=("0.mlp_out",))]
    cfg = HarvestConfig(batch_size=2, dense_table_bytes=0, cooccurrence_fraction=1.0)
    acc = HarvestAccumulator(Layout.of(sites, ["x"]), cfg, 19)
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        pre = torch.randn(2, 16, 25, generator=gen)
        acc.update(
            HarvestBatch(
                tokens=torch.randint(0, 19, (2, 16), generator=gen),
                firings={"s": pre > 0.9},
                activations={"s": {"x": torch.where(pre > 0.9, pre, torch.zeros_like(pre))}},
                next_token_logits=torch.randn(2, 16, 19, generator=gen),
            ),
            step,
        )
    meta = {"decomposition_id": "x", "world_size": 1, "seconds": 0.0}
    write_results(tmp_path / "seq", acc, meta, concurrent=False)
    write_results(tmp_path / "conc", acc, meta, concurrent=True)
    for name in (STATS_FILE, EXAMPLES_FILE):
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "conc" / name).read_bytes()
    assert load_file(tmp_path / "conc" / STATS_FILE)["cooc_t_cols"].numel() > 10
    rows = []
    for run in ("seq", "conc"):
        con = sqlite3.connect(tmp_path / run / DB_FILE)
        rows.append(con.execute("SELECT * FROM components ORDER BY gidx").fetchall())
        con.close()
    assert rows[0] == rows[1] and len(rows[0]) > 10


def _odd_tensors() -> dict[str, torch.Tensor | Lazy]:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(9_001, 7, generator=g)  # 252,028 bytes: many staging buffers, odd tail
    return {
        "a": torch.arange(5, dtype=torch.int64),
        "big": big,
        "chunked": Lazy(
            torch.float32, tuple(big.shape), lambda: big, lambda: iter(big.split(1_000))
        ),
        "flags": torch.rand(3_333, generator=g) > 0.5,
    }


@pytest.mark.parametrize("staging", [4096, 8192 * 3])
def test_direct_io_writes_the_bytes_of_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: int
) -> None:
    """Through O_DIRECT (a small staging buffer, so every path runs: full buffers, a padded
    tail truncated away) the file is byte for byte the buffered one."""
    from spd_host.harvest import direct_io

    monkeypatch.setattr(direct_io, "STAGING_BYTES", staging)
    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    sink = direct_io.open_sink(tmp_path / "probe", 1)
    direct = isinstance(sink, direct_io.DirectSink)
    sink.abort()
    if not direct and hasattr(__import__("os"), "O_DIRECT"):
        pytest.skip("this filesystem refuses O_DIRECT (the buffered fallback is what runs)")
    save_tensors(_odd_tensors(), tmp_path / "direct.safetensors")
    monkeypatch.setenv("SPD_HOST_DIRECT_IO", "0")
    save_tensors(_odd_tensors(), tmp_path / "buffered.safetensors")
    a = (tmp_path / "direct.safetensors").read_bytes()
    assert a == (tmp_path / "buffered.safetensors").read_bytes()
    assert len(a) % 4096 != 0  # the padded tail was truncated away
    got = load_file(tmp_path / "direct.safetensors")
    assert torch.equal(got["big"], got["chunked"]) and got["flags"].dtype == torch.bool


def test_direct_io_falls_back_where_the_filesystem_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/dev/full`` refuses O_DIRECT: the buffered path runs and its full-disk error comes
    back as before."""
    from spd_host.harvest import direct_io

    monkeypatch.setattr(direct_io, "MIN_DIRECT_BYTES", 0)
    with pytest.raises(OSError):
        save_tensors(_odd_tensors(), "/dev/full")


def test_a_failed_write_into_place_keeps_the_old_file_and_no_partial_one(tmp_path: Path) -> None:
    from spd_host.harvest.tensor_file import save_tensors_into_place

    target = tmp_path / "stats.safetensors"
    save_tensors_into_place({"a": torch.arange(4)}, target)
    before = target.read_bytes()

    def broken() -> torch.Tensor:
        raise RuntimeError("the builder failed")

    with pytest.raises(RuntimeError, match="builder failed"):
        save_tensors_into_place(
            {"a": torch.arange(4), "b": Lazy(torch.float32, (3,), broken)}, target, tag="-7"
        )
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]

"""The large-table code paths, at toy sizes, against brute force.

The sparse tables merge in place into reserved storage, in chunks of the table (moved from
the end), and fall back to fresh storage after ``state()`` hands the arrays out; these tests
shrink the chunk so that every path (in place, fresh storage, a shared snapshot, chunks
without insertions, insertions past the end) runs on a few hundred keys, and compare with a
``Counter``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from spd_host.harvest import sparse_counts
from spd_host.harvest.sparse_counts import SparsePairCounter


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("background", [False, True])
def test_chunked_in_place_merges_equal_brute_force(
    chunk: int, background: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparse_counts, "_MERGE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(chunk)
    counter = SparsePairCounter(40, 37, background=background)
    counter.buffer_limit = 20
    ref: Counter[int] = Counter()
    # (handed-out keys, values, and what they held then)
    snapshots: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = []
    for step in range(60):
        n = int(torch.randint(0, 45, (1,), generator=gen))
        # late steps add only keys above everything stored (insertions past the end)
        lo = 30 if step >= 50 else 0
        rows = torch.randint(lo, 40, (n,), generator=gen)
        cols = torch.randint(0, 37, (n,), generator=gen)
        w = torch.randint(1, 9, (n,), generator=gen)
        counter.add(rows, cols, w if step % 2 else None)
        for r, c, v in zip(rows.tolist(), cols.tolist(), w.tolist(), strict=True):
            ref[r * 37 + c] += v if step % 2 else 1
        if step % 13 == 5:  # a checkpoint: the handed-out arrays must not change afterwards
            st = counter.state("t")
            assert st["t.keys"].tolist() == sorted(ref)
            assert st["t.values"].tolist() == [ref[k] for k in sorted(ref)]
            snapshots.append(
                (st["t.keys"], st["t.values"], st["t.keys"].tolist(), st["t.values"].tolist())
            )
    st = counter.state("t")
    assert st["t.keys"].tolist() == sorted(ref)
    assert st["t.values"].tolist() == [ref[k] for k in sorted(ref)]
    assert counter._store is not None  # the in-place path was taken
    assert len(snapshots) >= 4
    for keys, values, keys_then, values_then in snapshots:
        assert keys.tolist() == keys_then
        assert values.tolist() == values_then


def test_merge_after_load_state_leaves_loaded_tensors_alone() -> None:
    a = SparsePairCounter(5, 5)
    a.add(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1]))
    st = {k: v.clone() for k, v in a.state("t").items()}
    loaded = {k: v.clone() for k, v in st.items()}
    b = SparsePairCounter(5, 5)
    b.load_state("t", loaded)
    b.add(torch.tensor([0, 4, 1]), torch.tensor([0, 4, 1]))
    assert b.state("t")["t.keys"].tolist() == [0, 1, 6, 11, 24]
    assert b.state("t")["t.values"].tolist() == [1, 1, 2, 1, 1]
    assert torch.equal(loaded["t.keys"], st["t.keys"])
    assert torch.equal(loaded["t.values"], st["t.values"])


def test_merge_of_only_new_keys_after_state_leaves_handed_out_arrays_alone() -> None:
    c = SparsePairCounter(10, 10)
    c.add(torch.tensor([1, 5, 9]), torch.tensor([0, 0, 0]))
    c.consolidate()
    c.add(torch.tensor([3]), torch.tensor([3]))  # a second merge: the table now has slack
    c.consolidate()
    assert c._store is not None
    st = c.state("t")
    keys, values = st["t.keys"], st["t.values"]
    c.add(torch.tensor([0, 2, 7]), torch.tensor([5, 5, 5]))  # no key in common
    assert c.state("t")["t.keys"].tolist() == [5, 10, 25, 33, 50, 75, 90]
    assert keys.tolist() == [10, 33, 50, 90] and values.tolist() == [1, 1, 1, 1]


def test_accumulator_with_background_merges_gives_the_synchronous_state() -> None:
    """Sparse token and co-occurrence tables with tiny buffers (a merge every batch or so, and
    a prune of the bounded token tables): the state after background merges is the same bits."""
    from spd_host.adapter import HarvestBatch, Site
    from spd_host.harvest import HarvestConfig
    from spd_host.harvest.accumulator import HarvestAccumulator, Layout

    sites = [Site(name="s", n_components=30, reads_from="0.mlp_in", writes_to=("0.mlp_out",))]
    B, S, V = 2, 16, 23
    accs = []
    for background in (False, True):
        cfg = HarvestConfig(
            batch_size=B,
            dense_table_bytes=0,
            cooccurrence_fraction=1.0,
            token_table_max_pairs=200,
            background_merge=background,
        )
        acc = HarvestAccumulator(Layout.of(sites, ["x"]), cfg, V)
        for t in (acc.input_pairs, acc.output_pairs, acc.cooc):
            assert isinstance(t, SparsePairCounter) and t.background == background
            t.buffer_limit = 40
        accs.append(acc)
    gen = torch.Generator().manual_seed(11)
    for step in range(40):
        pre = torch.randn(B, S, 30, generator=gen)
        batch = HarvestBatch(
            tokens=torch.randint(0, V, (B, S), generator=gen),
            firings={"s": pre > 1.0},
            activations={"s": {"x": torch.where(pre > 1.0, pre, torch.zeros_like(pre))}},
            next_token_logits=torch.randn(B, S, V, generator=gen) * 3,
        )
        for acc in accs:
            acc.update(batch, step)
    (a, meta_a), (b, meta_b) = (acc.state() for acc in accs)
    assert accs[0].prune_bound["input"] > 0  # the bounded tables were pruned
    assert accs[0].prune_bound == accs[1].prune_bound
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta_a["config"].pop("background_merge"), meta_b["config"].pop("background_merge")
    assert meta_a == meta_b

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
def test_chunked_in_place_merges_equal_brute_force(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sparse_counts, "_MERGE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(chunk)
    counter = SparsePairCounter(40, 37)
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

"""SparsePairCounter against a dict, under every consolidation schedule."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from spd_host.harvest.sparse_counts import SparsePairCounter
from spd_host.harvest.tensor_file import Lazy


@pytest.mark.parametrize("limit", [1, 7, 50, 1 << 24])
@pytest.mark.parametrize("unit_only", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_counts_equal_brute_force_for_any_buffer_limit(
    limit: int, unit_only: bool, background: bool
) -> None:
    gen = torch.Generator().manual_seed(limit)
    counter = SparsePairCounter(13, 11, background=background)
    counter.buffer_limit = limit
    ref: Counter[int] = Counter()
    for step in range(40):
        n = int(torch.randint(0, 30, (1,), generator=gen))
        rows = torch.randint(0, 13, (n,), generator=gen)
        cols = torch.randint(0, 11, (n,), generator=gen)
        w = torch.randint(1, 5, (n,), generator=gen)
        if (
            unit_only or step % 3 == 0
        ):  # unit weights (the co-occurrence path), mixed with weighted adds
            w = torch.ones_like(w)
            counter.add(rows, cols)
        else:
            counter.add(rows, cols, w)
        for r, c, v in zip(rows.tolist(), cols.tolist(), w.tolist(), strict=True):
            ref[r * 11 + c] += v
        if step % 9 == 0:
            assert counter.upper_len() >= len(counter)
        # the exact distinct count, without folding the buffer in: every step, any schedule
        buffered = counter._buf_len
        assert counter.distinct_len() == len(ref)
        assert counter._buf_len == buffered  # nothing was folded in
    state = counter.state("t")
    assert state["t.keys"].tolist() == sorted(ref)
    assert state["t.values"].tolist() == [ref[k] for k in sorted(ref)]
    for r in range(13):
        cols, vals = counter.row(r)
        assert dict(zip(cols.tolist(), vals.tolist(), strict=True)) == {
            k % 11: v for k, v in ref.items() if k // 11 == r
        }


def test_cooc_tables_give_symmetric_rows_like_dense_brute_force() -> None:
    from spd_host.harvest.store import cooc_tables

    gen = torch.Generator().manual_seed(3)
    n = 17
    dense = torch.zeros(n, n, dtype=torch.int64)
    for _ in range(60):
        i, j = sorted(torch.randint(0, n, (2,), generator=gen).tolist())
        if i != j:
            dense[i, j] += int(torch.randint(1, 9, (1,), generator=gen))
    keys = dense.nonzero()
    flat = keys[:, 0] * n + keys[:, 1]
    tables = cooc_tables(flat, dense[keys[:, 0], keys[:, 1]], n)
    t = {k: (v.make() if isinstance(v, Lazy) else v) for k, v in tables.items()}
    sym = dense + dense.T
    for r in range(n):
        cols: list[int] = []
        vals: list[int] = []
        for name in ("cooc_t", "cooc"):
            lo, hi = int(t[f"{name}_indptr"][r]), int(t[f"{name}_indptr"][r + 1])
            cols += t[f"{name}_cols"][lo:hi].tolist()
            vals += t[f"{name}_values"][lo:hi].tolist()
        assert cols == sym[r].nonzero().flatten().tolist()  # sorted columns
        assert vals == sym[r, cols].tolist()


def test_a_state_handed_out_is_not_changed_by_later_merges() -> None:
    """Existing keys are added to in place: a state() taken earlier must keep its values."""
    c = SparsePairCounter(10, 10)
    c.add(torch.tensor([1, 2]), torch.tensor([3, 4]))
    before = {k: v.clone() for k, v in c.state("t").items()}
    held = c.state("t")
    c.add(torch.tensor([1, 1, 5]), torch.tensor([3, 3, 5]))  # an existing key and a new one
    assert torch.equal(held["t.values"], before["t.values"])
    cols, vals = c.row(1)
    assert cols.tolist() == [3] and vals.tolist() == [3]
    loaded = SparsePairCounter(10, 10)
    src = c.state("t")
    loaded.load_state("t", src)
    kept = src["t.values"].clone()
    loaded.add(torch.tensor([2]), torch.tensor([4]))
    loaded.consolidate()
    assert torch.equal(src["t.values"], kept)
    assert dict(zip(loaded.keys.tolist(), loaded.values.tolist(), strict=True)) == {
        13: 3,
        24: 2,
        55: 1,
    }


def test_cooc_transpose_built_in_small_blocks_equals_a_stable_sort_by_column(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blockwise counting sort must give exactly the stable by-column order of the keys,
    wherever the block boundaries fall (here blocks of 7 keys, so columns straddle them)."""
    from spd_host.harvest import store

    gen = torch.Generator().manual_seed(11)
    n = 23
    pairs = torch.randint(0, n, (400, 2), generator=gen)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    flat = torch.unique(pairs[:, 0] * n + pairs[:, 1])  # sorted, distinct
    values = torch.randint(1, 1000, flat.shape, generator=gen)
    monkeypatch.setattr(store, "TRANSPOSE_BLOCK", 7)
    t = {
        k: (v.make() if isinstance(v, Lazy) else v)
        for k, v in store.cooc_tables(flat, values, n).items()
    }
    rows, cols = (flat // n).tolist(), (flat % n).tolist()
    ref = sorted(range(len(rows)), key=lambda e: (cols[e], e))  # stable by column
    assert t["cooc_t_cols"].tolist() == [rows[e] for e in ref]
    assert t["cooc_t_values"].tolist() == [int(values[e]) for e in ref]
    assert t["cooc_t_cols"].dtype == torch.int32 and t["cooc_t_values"].dtype == torch.int32
    counts = [0] * (n + 1)
    for c in cols:
        counts[c + 1] += 1
    assert t["cooc_t_indptr"].tolist() == list(itertools.accumulate(counts))
    assert t["cooc_cols"].tolist() == cols and t["cooc_values"].tolist() == values.tolist()


def test_background_merges_run_off_the_caller_and_give_the_same_bits() -> None:
    """A full buffer goes to the merge thread (the caller goes on), and queries in between
    (upper_len, row, len, a state) see every key added so far, as the synchronous table."""
    gen = torch.Generator().manual_seed(5)
    sync, bg = SparsePairCounter(50, 40), SparsePairCounter(50, 40, background=True)
    for t in (sync, bg):
        t.buffer_limit = 64
    ref: Counter[int] = Counter()
    handed_off = 0
    for step in range(80):
        n = int(torch.randint(1, 90, (1,), generator=gen))
        rows = torch.randint(0, 50, (n,), generator=gen)
        cols = torch.randint(0, 40, (n,), generator=gen)
        w = None if step % 3 == 0 else torch.randint(1, 7, (n,), generator=gen)
        for t in (sync, bg):
            t.add(rows, cols, w)
        handed_off += bg._pending is not None
        for r, c, v in zip(
            rows.tolist(),
            cols.tolist(),
            (w if w is not None else torch.ones(n, dtype=torch.int64)).tolist(),
            strict=True,
        ):
            ref[r * 40 + c] += v
        assert bg.upper_len() >= len(ref)
        if step % 11 == 3:
            r = int(rows[0])
            assert bg.row(r)[0].tolist() == sync.row(r)[0].tolist()
            assert bg.row(r)[1].tolist() == sync.row(r)[1].tolist()
        if step % 17 == 8:
            assert len(bg) == len(ref)
            assert bg.state("t")["t.keys"].tolist() == sorted(ref)
    assert handed_off > 10  # the background path was taken, not the synchronous one
    a, b = sync.state("t"), bg.state("t")
    assert torch.equal(a["t.keys"], b["t.keys"]) and torch.equal(a["t.values"], b["t.values"])
    assert b["t.values"].tolist() == [ref[k] for k in sorted(ref)]


def test_background_merge_waits_before_a_load_and_off_the_cpu_is_synchronous() -> None:
    c = SparsePairCounter(6, 6, background=True)
    c.buffer_limit = 2
    c.add(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    assert c._pending is not None
    c.load_state("t", {"t.keys": torch.tensor([7]), "t.values": torch.tensor([4])})
    assert c._pending is None and c.state("t")["t.keys"].tolist() == [7]
    assert not SparsePairCounter(6, 6, device="meta", background=True).background


@pytest.mark.parametrize("background", [False, True])
def test_bound_prunes_only_above_the_cap_and_sums_its_thresholds(background: bool) -> None:
    """``bound(cap, keep)`` (queued behind the merge on a background table) keeps the pairs
    above the k-th smallest count, only once more than ``cap`` distinct pairs are in, and
    ``pruned_total`` is the sum of the thresholds, as ``prune`` returned them."""
    gen = torch.Generator().manual_seed(9)
    t = SparsePairCounter(40, 40, background=background)
    t.buffer_limit = 50
    ref: Counter[int] = Counter()
    taus = []
    for step in range(30):
        rows = torch.randint(0, 40, (60,), generator=gen)
        cols = (rows * 7 + torch.randint(0, 25, (60,), generator=gen)) % 40
        t.add(rows, cols)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            ref[r * 40 + c] += 1
        if step % 5 == 4:
            t.bound(300, 150)
            if len(ref) > 300:  # brute force: the same drop on the reference
                tau = sorted(ref.values())[len(ref) - 150 - 1]
                ref = Counter({k: v for k, v in ref.items() if v > tau})
                taus.append(tau)
    assert len(taus) >= 2  # it pruned, more than once
    assert t.pruned_total() == sum(taus)
    st = t.state("t")
    assert st["t.keys"].tolist() == sorted(ref)
    assert st["t.values"].tolist() == [ref[k] for k in sorted(ref)]

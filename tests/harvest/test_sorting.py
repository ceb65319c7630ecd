"""The harvest's fast CPU sorts against the definition of a stable sort (Python's ``sorted``)."""

from __future__ import annotations

import pytest
import torch

from spd_host.harvest import sorting
from spd_host.harvest.sorting import kth_smallest, sort_with_order, sorted_keys


def stable_reference(keys: torch.Tensor) -> tuple[list[int], list[int]]:
    """Python's sort is stable by definition: equal keys keep their input order."""
    order = sorted(range(keys.numel()), key=lambda i: int(keys[i]))
    return [int(keys[i]) for i in order], order


@pytest.fixture(autouse=True)
def numpy_route_for_small_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the numpy route from 8 keys, so that inputs small enough for the brute-force
    reference exercise it (the threshold is a speed choice, not a semantic one)."""
    monkeypatch.setattr(sorting, "SMALL", 8)


@pytest.mark.parametrize(
    ("n", "lo", "hi"),
    [
        (5000, 0, 40),  # many ties: stability decides the order
        (5000, 0, 2**40),  # distinct keys, packed beside 13 position bits
        (3000, 2**50, 2**55),  # too wide to pack: the torch fallback
        (3000, -(2**20), 2**20),  # negative keys: the torch fallback
        (5, 0, 9),  # below the threshold
    ],
)
def test_sort_with_order_is_the_stable_sort(n: int, lo: int, hi: int) -> None:
    keys = torch.randint(
        lo, hi, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64
    )
    before = keys.clone()
    got, order = sort_with_order(keys)
    ref_sorted, ref_order = stable_reference(keys)
    assert got.tolist() == ref_sorted
    assert order.tolist() == ref_order
    assert got.dtype == order.dtype == torch.int64
    assert torch.equal(keys, before)  # the input is not sorted in place
    assert torch.equal(sorted_keys(keys), torch.tensor(ref_sorted, dtype=torch.int64))


def test_empty_and_single() -> None:
    for keys in (torch.empty(0, dtype=torch.int64), torch.tensor([7])):
        got, order = sort_with_order(keys)
        assert got.tolist() == keys.tolist() and order.tolist() == list(range(keys.numel()))


@pytest.mark.parametrize("distinct", [3, 10_000])
def test_kth_smallest_matches_the_sorted_list(distinct: int) -> None:
    values = torch.randint(0, distinct, (4000,), generator=torch.Generator().manual_seed(distinct))
    ordered = sorted(values.tolist())
    for k in (1, 2, 1999, 4000):
        assert kth_smallest(values, k) == ordered[k - 1]


@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_table_through_the_numpy_route_matches_a_dict(weighted: bool) -> None:
    """Consolidations (sort, merge) and a prune on the numpy route give the brute-force sums."""
    from spd_host.harvest.sparse_counts import SparsePairCounter

    gen = torch.Generator().manual_seed(3)
    table = SparsePairCounter(50, 70)
    table.buffer_limit = 300
    ref: dict[int, int] = {}
    for _ in range(12):
        rows = torch.randint(0, 50, (200,), generator=gen)
        cols = torch.randint(0, 70, (200,), generator=gen)
        w = torch.randint(1, 9, (200,), generator=gen) if weighted else None
        table.add(rows, cols, w)
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
            ref[r * 70 + c] = ref.get(r * 70 + c, 0) + (1 if w is None else int(w[i]))
    table.consolidate()
    assert table.keys.tolist() == sorted(ref)
    assert table.values.tolist() == [ref[k] for k in sorted(ref)]
    tau = table.prune(100)
    assert tau == sorted(ref.values())[len(ref) - 100 - 1]
    assert table.keys.tolist() == sorted(k for k, v in ref.items() if v > tau)

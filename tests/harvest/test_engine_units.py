"""Engine parts against independent references: exact sums, co-occurrence by either method,
next-token top-k without a softmax, and the contract checks of the sparse and top-k forms."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from spd_host.adapter import (
    HarvestBatch,
    NextTokenTopK,
    Site,
    SparseActivity,
    next_token_topk_of,
    validate_harvest_batch,
)
from spd_host.errors import HarvestBatchError
from spd_host.harvest import cooccurrence
from spd_host.harvest.exact import ExactSum, split_fixed
from spd_host.harvest.next_token import next_token_topk
from spd_host.harvest.sparse_counts import DensePairCounter, SparsePairCounter


def _floats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.empty(n).uniform_(-14, 5, generator=g)  # tiny to large
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(torch.float32)


def test_exact_sum_equals_rational_sum_in_any_order() -> None:
    x = _floats(3000, 0)
    idx = torch.randint(0, 5, (3000,), generator=torch.Generator().manual_seed(1))
    exact = [
        sum((Fraction(float(v)) for v, i in zip(x, idx, strict=True) if int(i) == k), Fraction(0))
        for k in range(5)
    ]
    sums = []
    for perm_seed in (2, 3):
        p = torch.randperm(3000, generator=torch.Generator().manual_seed(perm_seed))
        s = ExactSum((5,))
        for chunk in torch.arange(3000)[p].split(701):  # several calls, shuffled order
            q, fine = split_fixed(x[chunk], 32)
            s.index_add_(idx[chunk], q, max_per_entry=701, fine=fine)
        sums.append(s)
    a, b = sums
    assert torch.equal(a.value(), b.value())
    assert all(
        torch.equal(u, v) for u, v in zip(a.state("s").values(), b.state("s").values(), strict=True)
    )
    for k in range(5):  # within 2**-65 per contribution of the exact rational sum
        assert abs(Fraction(float(a.value()[k])) - exact[k]) <= 3000 * Fraction(1, 2**65) + abs(
            exact[k]
        ) * Fraction(1, 2**52)


def _entries(
    seed: int, N: int, C: int, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    F = torch.rand(N, C, generator=torch.Generator().manual_seed(seed)) < p
    n, g = F.nonzero().unbind(1)
    return F, n, g


@pytest.mark.parametrize("method", ["product", "pairs", "pairs-chunked"])
@pytest.mark.parametrize("table", ["dense", "sparse"])
def test_cooccurrence_methods_equal_brute_force(
    method: str, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    C = 40
    factor = 1e30 if method == "product" else 0.0
    if method == "pairs-chunked":  # chunks of a few pairs: boundaries inside and between runs
        monkeypatch.setattr(cooccurrence, "_MAX_PAIRS_PER_CHUNK", 7)
    monkeypatch.setattr(cooccurrence, "MATMUL_FACTOR", {"cpu": factor, "cuda": factor})
    counter = DensePairCounter(C, C) if table == "dense" else SparsePairCounter(C, C)
    F_all = torch.zeros(0, C, dtype=torch.bool)
    for seed in range(3):
        F, n, g = _entries(seed, 30, C, 0.3)
        p = torch.randperm(n.shape[0], generator=torch.Generator().manual_seed(9))
        cooccurrence.count_batch(counter, n[p], g[p], C)  # any entry order
        F_all = torch.cat([F_all, F])
    ref = F_all.double().T @ F_all.double()
    i, j = torch.triu_indices(C, C, 1)
    nz = ref[i, j] > 0
    counter.consolidate()
    assert counter.keys.tolist() == (i * C + j)[nz].tolist()
    assert counter.values.tolist() == ref[i, j][nz].to(torch.int64).tolist()


def test_next_token_topk_without_softmax_matches_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=g) * 4
    ref_p = torch.softmax(logits.double(), -1).reshape(6, 50)
    empty: dict[str, torch.Tensor] = {}
    for batch in (
        HarvestBatch(
            tokens=torch.zeros(2, 3), firings=empty, activations={}, next_token_logits=logits
        ),
        HarvestBatch(
            tokens=torch.zeros(2, 3),
            firings=empty,
            activations={},
            next_token_topk=next_token_topk_of(logits, 9),  # more than asked: trimmed to 7
        ),
    ):
        pv, pi = next_token_topk(batch, 6, 7, 50, torch.device("cpu"))
        assert pv.shape == (6, 7)
        top = torch.topk(ref_p, 7, dim=-1)
        assert torch.equal(pi.sort(-1).values, top.indices.sort(-1).values)
        assert torch.allclose(pv, torch.gather(ref_p, 1, pi), rtol=1e-6, atol=0)


SITE = [Site(name="s", n_components=4, reads_from="0.mlp_in", writes_to=("0.mlp_out",))]


def _sparse_batch(**change: object) -> HarvestBatch:
    sp = dict(
        position=torch.tensor([0, 1, 5]),
        component=torch.tensor([3, 0, 2]),
        values={"a": torch.tensor([1.0, 2.0, 0.5])},
    )
    sp.update(change)
    logits = torch.randn(2, 3, 11)
    return HarvestBatch(
        tokens=torch.zeros(2, 3, dtype=torch.int64),
        firings={},
        activations={},
        sparse={"s": SparseActivity(**sp)},  # type: ignore[arg-type]
        next_token_topk=next_token_topk_of(logits, 4),
    )


def test_valid_sparse_topk_batch_passes() -> None:
    validate_harvest_batch(
        _sparse_batch(), sites=SITE, activation_types=["a"], plugin="p", min_top_k=4
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"component": torch.tensor([3, 0, 4])}, "sparse['s'].component has values outside [0, 4)"),
        ({"position": torch.tensor([0, 1, 6])}, "sparse['s'].position has values outside [0, 6)"),
        ({"values": {"a": torch.tensor([1.0, float("nan"), 0.5])}}, "contains NaN or inf"),
        ({"values": {"b": torch.ones(3)}}, "has types ['b'], expected ['a']"),
        ({"position": torch.tensor([0, 1])}, "has 2 positions but 3 components"),
    ],
)
def test_invalid_sparse_sites_are_named(change: dict[str, object], fragment: str) -> None:
    with pytest.raises(HarvestBatchError, match="plugin 'p'") as info:
        validate_harvest_batch(
            _sparse_batch(**change), sites=SITE, activation_types=["a"], plugin="p"
        )
    assert fragment in str(info.value)


def test_top_k_smaller_than_asked_and_bad_indices_are_errors() -> None:
    with pytest.raises(
        HarvestBatchError, match="carries 4 tokens per position, the host asked for 6"
    ):
        validate_harvest_batch(
            _sparse_batch(), sites=SITE, activation_types=["a"], plugin="p", min_top_k=6
        )
    b = _sparse_batch()
    assert b.next_token_topk is not None
    b.next_token_topk = NextTokenTopK(
        b.next_token_topk.values, b.next_token_topk.indices + 20, b.next_token_topk.logsumexp, 11
    )
    with pytest.raises(HarvestBatchError, match=r"indices has values outside \[0, 11\)"):
        validate_harvest_batch(b, sites=SITE, activation_types=["a"], plugin="p")


def test_duplicate_sparse_entries_are_a_clear_error() -> None:
    from spd_host.harvest import HarvestConfig
    from spd_host.harvest.accumulator import HarvestAccumulator, Layout

    acc = HarvestAccumulator(Layout.of(SITE, ["a"]), HarvestConfig(batch_size=2), 11)
    with pytest.raises(HarvestBatchError, match="lists a \\(position, component\\) entry twice"):
        acc.update(
            _sparse_batch(position=torch.tensor([0, 5, 5]), component=torch.tensor([3, 2, 2])), 0
        )


def test_descending_key_sorts_like_a_float_sort() -> None:
    from spd_host.harvest.examples import descending_key

    x = torch.cat(
        [
            _floats(500, 5),
            torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0, 1.0, -0.0, 0.0]),
        ]
    )
    o = torch.sort(descending_key(x), stable=True).indices
    assert torch.equal(o, torch.sort(x, descending=True, stable=True).indices)


def test_rank_in_runs_counts_positions_inside_each_run_of_equal_values() -> None:
    from spd_host.harvest.runs import rank_in_runs

    assert rank_in_runs(torch.tensor([3, 3, 5, 5, 5, 7])).tolist() == [0, 1, 0, 1, 2, 0]
    assert rank_in_runs(torch.tensor([4])).tolist() == [0]
    assert rank_in_runs(torch.empty(0, dtype=torch.int64)).tolist() == []

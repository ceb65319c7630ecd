"""Exact co-occurrence counts of one batch, by the cheaper of two equivalent methods.

``n(i, j)`` (``i < j``) is the number of counted positions where both fire. Two ways to get a
batch's contribution, with identical (integer, exact) results:

- **pairs**: per position, every pair of its ``L`` firing components (``L(L-1)/2`` keys;
  positions with the same ``L`` share one ``triu_indices`` gather); cost ``sum L^2 / 2``.
- **matrix product**: ``F^T F`` over the batch's ``A`` distinct firing components, ``F`` the
  ``[P, A]`` 0/1 matrix of the ``P`` positions with a firing; cost ``P * A^2`` multiply-adds
  on the BLAS / tensor units. Exact: float32 sums of 0/1 products are exact below ``2**24``
  (CPU; ``P < 2**24`` always holds for a batch) and the CUDA product runs in float64, where
  TF32 never applies.

``count_batch`` picks by estimated cost (results do not depend on the choice, so the choice
may depend on the device): the product when ``P * A^2`` is below ``MATMUL_FACTOR[device] *``
the pair count and ``A^2`` stays below ``MAX_PRODUCT_ENTRIES``, else pairs. Where the counts go
(a dense ``C x C`` table when it fits ``HarvestConfig.dense_table_bytes``, else sparse sorted
keys) is the counter's business: see ``sparse_counts.pair_counter``.
"""

from __future__ import annotations

import torch

from spd_host.harvest.sparse_counts import DensePairCounter, PairCounter

_MAX_PAIRS_PER_CHUNK = 1 << 24
MAX_PRODUCT_ENTRIES = 1 << 26
MATMUL_FACTOR = {"cpu": 4.0, "cuda": 256.0}


def count_batch(counter: PairCounter, n: torch.Tensor, g: torch.Tensor, C: int) -> None:
    """Add the pairs of firing entries ``(n, g)`` (position, global component) to ``counter``."""
    if n.numel() == 0:
        return
    order = torch.sort(n * C + g).indices
    n, g = n[order], g[order]
    un, pos_idx, counts = torch.unique_consecutive(n, return_inverse=True, return_counts=True)
    n_pairs = int((counts * (counts - 1) // 2).sum())
    if n_pairs == 0:
        return
    ug, comp_idx = torch.unique(g, return_inverse=True)
    P, A = int(un.shape[0]), int(ug.shape[0])
    factor = MATMUL_FACTOR.get(n.device.type, MATMUL_FACTOR["cpu"])
    if A * A <= MAX_PRODUCT_ENTRIES and factor * n_pairs >= P * A * A:
        _by_product(counter, pos_idx, comp_idx, ug, P, A, C)
    else:
        _by_pairs(counter, g, counts, C)


def _by_product(
    counter: PairCounter,
    pos_idx: torch.Tensor,
    comp_idx: torch.Tensor,
    ug: torch.Tensor,
    P: int,
    A: int,
    C: int,
) -> None:
    dev = ug.device
    dtype = torch.float64 if dev.type == "cuda" else torch.float32
    F = torch.zeros(P, A, dtype=dtype, device=dev)
    F[pos_idx, comp_idx] = 1
    M = (F.T @ F).to(torch.int64).triu_(1)
    if isinstance(counter, DensePairCounter):
        counter.add_dense_(ug, M)
        return
    i, j = M.nonzero().unbind(1)
    counter.add_keys(ug[i] * C + ug[j], M[i, j])


def _by_pairs(counter: PairCounter, g: torch.Tensor, counts: torch.Tensor, C: int) -> None:
    """Every pair ``(a, b)``, ``a`` before ``b`` within a position's run of ``g``, as keys.

    Vectorised over all positions at once: entry ``e`` pairs with the ``later[e]`` entries
    after it in its run, so ``repeat_interleave`` lists each pair's first entry and an offset
    within that entry's block gives the second (no loop over run lengths). Chunked so that
    at most about ``_MAX_PAIRS_PER_CHUNK`` keys exist at once.
    """
    dev = g.device
    ends = torch.cumsum(counts, 0)
    end_of = torch.repeat_interleave(ends, counts)  # one past the run's last entry
    later = end_of - torch.arange(g.shape[0], device=dev) - 1
    block_end = torch.cumsum(later, 0)
    e0 = 0
    while e0 < g.shape[0]:
        base = int(block_end[e0 - 1]) if e0 else 0
        # entries e0..e1 whose pairs fit the chunk (at least one entry)
        e1 = int(torch.searchsorted(block_end, base + _MAX_PAIRS_PER_CHUNK, right=True))
        e1 = max(e1, e0 + 1)
        rep = later[e0:e1]
        first = torch.repeat_interleave(torch.arange(e0, e1, device=dev), rep)
        if first.numel():
            start = block_end[e0:e1] - rep  # block start of each entry, in pair numbering
            k = torch.arange(base, base + first.shape[0], device=dev)
            second = first + 1 + (k - start.index_select(0, first - e0))
            counter.add_keys(g.index_select(0, first) * C + g.index_select(0, second))
        e0 = e1

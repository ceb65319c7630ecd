"""Sorts of int64 keys, the harvest's most common bulk operation, at CPU speed.

Why: on the CPU ``torch.sort`` of 16M int64 keys takes several seconds on one thread, and the
harvest sorts that much at every consolidation of a sparse table plus ~0.5M keys several times
per batch (entries by component, example plans, co-occurrence pairs). numpy's sort of the
same keys is a vectorised quicksort (AVX2/AVX-512 where the CPU has them), measured 4-7x faster
here. A sort that must also return the permutation packs each key with its position into one
int64 (``key << b | i``, ``b`` bits for the positions) and sorts that: the packed values are
distinct, so the result is the unique stable order, whatever the sort algorithm.

On other devices, for keys that do not fit beside their positions (or are negative), and for
small inputs, these fall back to ``torch.sort(stable=True)``: the same result, as every order
returned here is the stable one.
"""

from __future__ import annotations

import numpy as np
import torch

SMALL = 1 << 20
"""Below this many keys torch's own sort is about as fast (measured: 2x slower at 2^20 keys,
3.6x at 2^24; at 2^19 the two were even)."""


def _numpy_route(keys: torch.Tensor) -> bool:
    return keys.device.type == "cpu" and keys.dtype == torch.int64 and keys.numel() >= SMALL


def sorted_keys(keys: torch.Tensor) -> torch.Tensor:
    """An ascending copy of the 1-D int64 ``keys``."""
    if not _numpy_route(keys):
        return torch.sort(keys).values
    out = keys.detach().contiguous().numpy().copy()
    out.sort()
    return torch.from_numpy(out)


def sort_with_order(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted keys, order)`` of the 1-D int64 ``keys``: ``keys[order]`` is sorted, and equal
    keys keep their input order (stable), as ``torch.sort(keys, stable=True)``."""
    n = int(keys.numel())
    if not _numpy_route(keys):
        return torch.sort(keys, stable=True)
    lo, hi = (int(x) for x in torch.aminmax(keys))
    pos_bits = max(1, (n - 1).bit_length())
    if lo < 0 or hi.bit_length() + pos_bits > 63:
        return torch.sort(keys, stable=True)
    packed = torch.bitwise_left_shift(keys, pos_bits)
    packed |= torch.arange(n, dtype=torch.int64)
    a = packed.numpy()
    a.sort()
    order = packed & ((1 << pos_bits) - 1)
    packed >>= pos_bits
    return packed, order


def kth_smallest(values: torch.Tensor, k: int) -> int:
    """The ``k``-th smallest (1-based) of the 1-D integer ``values``, as ``torch.kthvalue``.

    On the CPU numpy's introselect (measured 1.1x faster on 48M spread-out counts, 4.7x on
    counts with few distinct values, the common case of a token table's tail)."""
    if values.device.type != "cpu" or values.numel() < SMALL:
        return int(torch.kthvalue(values.cpu(), k).values)
    return int(np.partition(values.detach().contiguous().numpy(), k - 1)[k - 1])

"""Ranks inside runs of equal values: the grouping step every sort-based plan shares."""

from __future__ import annotations

import torch


def rank_in_runs(sorted_values: torch.Tensor) -> torch.Tensor:
    """Position of each element inside its run of equal values (``sorted_values`` grouped, e.g.
    sorted): ``[3, 3, 5, 5, 5, 7] -> [0, 1, 0, 1, 2, 0]``, on the values' device."""
    n = sorted_values.shape[0]
    dev = sorted_values.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    starts = torch.ones(n, dtype=torch.bool, device=dev)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    ar = torch.arange(n, device=dev)
    return ar - torch.cummax(torch.where(starts, ar, 0), 0).values

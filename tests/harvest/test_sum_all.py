"""The all-positions activation sum against a dense float64 column sum, in every regime."""

from __future__ import annotations

import pytest
import torch

from spd_host.harvest.accumulator import _add_sum_all


@pytest.mark.parametrize("regime", ["only_where_firing", "sparse_elsewhere", "dense"])
def test_sum_all_matches_dense_sum(regime: str) -> None:
    gen = torch.Generator().manual_seed(0)
    N, C, off = 64, 9, 5
    pre = torch.randn(N, C, generator=gen)
    fired = pre > 0.8
    if regime == "only_where_firing":
        a = torch.where(fired, pre, torch.zeros_like(pre))
    elif regime == "sparse_elsewhere":
        a = torch.where(pre > 1.5, pre, torch.zeros_like(pre))  # non-zero where it does not fire
        fired = pre > 1.7
    else:
        a = pre
    n, cl = fired.nonzero().unbind(1)
    v = a[n, cl]
    out = torch.zeros(off + C + 3, dtype=torch.float64)
    _add_sum_all(out, a, v, v.to(torch.float64), cl + off, off)
    expected = torch.zeros_like(out)
    expected[off : off + C] = a.double().sum(0)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)

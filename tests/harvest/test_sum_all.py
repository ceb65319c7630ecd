"""The all-positions activation sum against a dense float64 column sum, in every regime."""

from __future__ import annotations

import pytest
import torch

from spd_host.adapter import HarvestBatch, Site
from spd_host.harvest import HarvestConfig
from spd_host.harvest.accumulator import HarvestAccumulator, Layout


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
    # a first site of `off` components that never fire, so the site under test sits at `off`
    sites = [
        Site(name=n, n_components=c, reads_from="0.mlp_in", writes_to=("0.mlp_out",))
        for n, c in (("first", off), ("second", C))
    ]
    acc = HarvestAccumulator(
        Layout.of(sites, ["x"]), HarvestConfig(batch_size=1, cooccurrence=False), 7
    )
    acc.update(
        HarvestBatch(
            tokens=torch.zeros(1, N, dtype=torch.int64),
            firings={"first": torch.zeros(1, N, off, dtype=torch.bool), "second": fired[None]},
            activations={"first": {"x": torch.zeros(1, N, off)}, "second": {"x": a[None]}},
        ),
        0,
    )
    out = torch.zeros(off + C, dtype=torch.float64)
    out[:] = acc.sum_all.value()[0]
    expected = torch.zeros_like(out)
    expected[off : off + C] = a.double().sum(0)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)

"""Reservoir uniformity (Algorithm R per component, and the weighted merge), chi-square tests.

Each of many components fires at every position, so one harvest gives many independent
reservoirs; inclusion counts per firing index must be uniform (expected ``trials * K / n``).
The seed is fixed, so the statistic is deterministic; the bound is the 0.999 quantile.
"""

from __future__ import annotations

import torch

from spd_host.adapter import HarvestBatch, Site
from spd_host.harvest import HarvestConfig
from spd_host.harvest.accumulator import HarvestAccumulator, Layout
from spd_host.harvest.merge import merge_accumulators

C = 1500  # independent reservoirs
K = 4
V = 7
# chi-square 0.999 quantiles (df -> value), from tables
CHI2_999 = {29: 58.30, 39: 72.05}


def _all_fire_batch(S: int) -> HarvestBatch:
    act = torch.arange(1, S + 1, dtype=torch.float32)[None, :, None].expand(1, S, C).contiguous()
    return HarvestBatch(
        tokens=torch.zeros(1, S, dtype=torch.int64),
        firings={"s": torch.ones(1, S, C, dtype=torch.bool)},
        activations={"s": {"a": act}},
        next_token_logits=torch.zeros(1, S, V),
    )


def _acc(seed: int) -> HarvestAccumulator:
    layout = Layout.of(
        [Site(name="s", n_components=C, reads_from="0.mlp_in", writes_to=("0.mlp_out",))], ["a"]
    )
    cfg = HarvestConfig(
        examples_per_component=K, context_tokens=0, seed=seed, cooccurrence=False, batch_size=1
    )
    return HarvestAccumulator(layout, cfg, V)


def _inclusion(acc: HarvestAccumulator, n: int) -> torch.Tensor:
    bank = acc.reservoir
    assert bank.n_rows == C
    assert bool((bank.filled[:C] == K).all())
    pos = bank.pos[:C, :K]
    # every reservoir holds K distinct firings
    assert bool((pos.sort(1).values.diff(1) > 0).all())
    return torch.bincount(pos.flatten(), minlength=n)[:n].double()


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_reservoir_uniform_over_all_firings_across_batches() -> None:
    acc = _acc(seed=7)
    # 30 firings per component, spread over three batches of 10 positions (global index = pos)
    for g in range(3):
        acc.update(_all_fire_batch(10), g)
    counts = _inclusion(acc, 30)
    assert counts.sum() == C * K
    assert _chi2(counts) < CHI2_999[29]
    # the first batch alone would hold all K: later firings must be well represented
    assert counts[20:].sum() > 0.25 * C * K


def test_merged_reservoir_is_uniform_over_both_shards() -> None:
    # shard 0 sees 30 firings per component, shard 1 sees 10: an unweighted merge would
    # over-represent shard 1 (half the sample from a quarter of the firings)
    a, b = _acc(seed=3), _acc(seed=3)
    for g in (0, 2, 4):
        a.update(_all_fire_batch(10), g)
    b.update(_all_fire_batch(10), 1)
    merged = merge_accumulators([a, b])
    assert int(merged.firing_count[0]) == 40
    assert bool((merged.reservoir.filled[:C] == K).all())
    pos = merged.reservoir.pos[:C, :K]
    # map global positions (batch g, offset s) -> firing index 0..39
    batch, s = pos // 10, pos % 10
    order = {0: 0, 2: 1, 4: 2, 1: 3}
    idx = torch.tensor([order[int(x)] for x in batch.flatten()]).reshape(batch.shape) * 10 + s
    assert bool((idx.sort(1).values.diff(1) > 0).all())
    counts = torch.bincount(idx.flatten(), minlength=40).double()
    assert _chi2(counts) < CHI2_999[39]
    share_b = counts[30:].sum() / counts.sum()
    assert abs(float(share_b) - 0.25) < 0.02


def test_reservoir_is_a_function_of_seed_and_batch_index() -> None:
    a, b = _acc(seed=11), _acc(seed=11)
    for g in range(3):
        a.update(_all_fire_batch(10), g)
        b.update(_all_fire_batch(10), g)
    assert torch.equal(a.reservoir.pos, b.reservoir.pos)
    c = _acc(seed=12)
    for g in range(3):
        c.update(_all_fire_batch(10), g)
    assert not torch.equal(a.reservoir.pos, c.reservoir.pos)

"""Combining shard states into one, exactly.

Counts, sums and sparse pair tables add; maxima take the max; histograms add. Top-K lists are
re-ranked over the union. Reservoirs are merged so that the result is again a uniform sample
of all firings: for a component with ``n1`` and ``n2`` firings in the two shards, the number
taken from shard 1 is drawn from the hypergeometric distribution (``m = min(K, n1 + n2)``
draws without replacement from a population of ``n1`` + ``n2``), then that many are taken
uniformly from shard 1's sample (itself uniform over its ``n1`` firings) and the rest from
shard 2's. The draws come from a generator seeded by ``seed`` and the merge position.
"""

from __future__ import annotations

import torch

from spd_host.harvest.accumulator import HarvestAccumulator, batch_generator
from spd_host.harvest.examples import ExampleBank
from spd_host.harvest.runs import rank_in_runs
from spd_host.harvest.windows import Windows


def merge_accumulators(parts: list[HarvestAccumulator]) -> HarvestAccumulator:
    """Merge shard accumulators (in the order given) into the first one and return it."""
    if not parts:
        raise ValueError("nothing to merge")
    acc = parts[0]
    for i, other in enumerate(parts[1:], start=1):
        if other.layout != acc.layout or other.V != acc.V:
            raise ValueError("shards come from different decompositions or vocabularies")
        gen = batch_generator(acc.config.seed, -1000 - i)
        before = acc.firing_count.clone()
        acc.firing_count += other.firing_count
        acc.sum_all.merge_(other.sum_all)
        acc.sum_firing.merge_(other.sum_firing)
        acc.max_firing = torch.maximum(acc.max_firing, other.max_firing)
        acc.hist += other.hist
        acc.token_count += other.token_count
        acc.next_token_mass += other.next_token_mass
        acc.kept_mass_total += other.kept_mass_total
        for name in ("input", "output"):  # under-estimates of the shards add up
            acc.prune_base[name] += other.prune_bound[name]
        acc.output_kept_mass += other.output_kept_mass
        acc.input_pairs.merge_(other.input_pairs)
        acc.output_pairs.merge_(other.output_pairs)
        acc.cooc.merge_(other.cooc)
        acc.cooc_count += other.cooc_count
        acc.cooc_n_tokens += other.cooc_n_tokens
        acc.cooc_active = acc.cooc_active and other.cooc_active
        acc.n_tokens += other.n_tokens
        acc.n_batches += other.n_batches
        merge_reservoir(acc.reservoir, other.reservoir, before, other.firing_count, gen)
        merge_top(acc.top, other.top)
    return acc


def _entries(bank: ExampleBank, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bank.filled_slots(rows)


def _put(
    bank: ExampleBank, rows: torch.Tensor, slots: torch.Tensor, d: dict[str, torch.Tensor]
) -> None:
    """Write dense (logical) entries ``d`` into slots of ``bank``."""
    bank.write(rows, slots, d["score"], d["pos"], Windows(d["tokens"], d["acts"], d["fired"]))


def merge_top(a: ExampleBank, b: ExampleBank) -> None:
    """Top-K of the union, written into ``a``."""
    if b.n_rows == 0:
        return
    comps = b.component
    rows_a = a.rows_for(comps)
    ar, asl = _entries(a, rows_a)
    br, bsl = _entries(b, torch.arange(b.n_rows))
    # express b's entries in a's row numbering
    br_in_a = a.row_of[b.component[br]]
    rows = torch.cat([ar, br_in_a])
    score = torch.cat([a.score[ar, asl], b.score[br, bsl]])
    from_b = torch.cat(
        [torch.zeros_like(ar, dtype=torch.bool), torch.ones_like(br, dtype=torch.bool)]
    )
    src_row = torch.cat([ar, br])
    src_slot = torch.cat([asl, bsl])
    pos = torch.cat([a.field("pos", ar, asl), b.field("pos", br, bsl)])
    o = torch.sort(pos, stable=True).indices
    o = o[torch.sort(score[o], descending=True, stable=True).indices]
    o = o[torch.sort(rows[o], stable=True).indices]
    r = rows[o]
    rank = rank_in_runs(r)
    keep = rank < a.k
    o, r, rank = o[keep], r[keep], rank[keep]
    # the kept entries' windows, read from their own bank (dense, logical form)
    fb = from_b[o]
    sel_a, sel_b = torch.nonzero(~fb).flatten(), torch.nonzero(fb).flatten()
    da = a.dense(src_row[o][sel_a], src_slot[o][sel_a])
    db = b.dense(src_row[o][sel_b], src_slot[o][sel_b])
    _put(a, r[sel_a], rank[sel_a], da)
    _put(a, r[sel_b], rank[sel_b], db)
    filled = torch.zeros_like(a.filled).scatter_reduce_(0, r, rank + 1, "amax")
    touched = torch.unique(r)
    a.filled[touched] = filled[touched]


def merge_reservoir(
    a: ExampleBank, b: ExampleBank, n_a: torch.Tensor, n_b: torch.Tensor, gen: torch.Generator
) -> None:
    """Uniform sample of the union of two uniform samples, weighted by firing counts."""
    if b.n_rows == 0:
        return
    k = a.k
    comps = b.component
    rows_a = a.rows_for(comps)
    rows_b = torch.arange(b.n_rows)
    na = n_a[comps].to(torch.float64)
    nb = n_b[comps].to(torch.float64)
    m = torch.clamp(na + nb, max=k).to(torch.int64)
    # sequential hypergeometric draw of how many come from a
    ra, rb = na.clone(), nb.clone()
    take_a = torch.zeros_like(m)
    for j in range(k):
        active = j < m
        u = torch.rand(m.shape[0], generator=gen, dtype=torch.float64)
        pick_a = active & (u * (ra + rb) < ra)
        pick_b = active & ~pick_a
        take_a += pick_a.to(torch.int64)
        ra -= pick_a.to(torch.float64)
        rb -= pick_b.to(torch.float64)
    take_b = m - take_a

    # uniform subsets: random order of each row's filled entries, take the first few
    def chosen(
        bank: ExampleBank, rows: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = torch.rand(rows.shape[0], k, generator=gen)
        slot = torch.arange(k)[None, :].expand(rows.shape[0], k)
        keys = torch.where(slot < bank.filled[rows][:, None], keys, torch.full_like(keys, 2.0))
        perm = torch.argsort(keys, dim=1)
        sel = slot < count[:, None]
        return rows[:, None].expand_as(slot)[sel], perm[sel], torch.nonzero(sel)[:, 0]

    a_rows_src, a_slots_src, a_owner = chosen(a, rows_a, take_a)
    b_rows_src, b_slots_src, b_owner = chosen(b, rows_b, take_b)
    data_a = a.dense(a_rows_src, a_slots_src)
    data_b = b.dense(b_rows_src, b_slots_src)
    dst_rows_a = rows_a[a_owner]
    dst_slot_a = rank_in_runs(a_owner)
    dst_rows_b = rows_a[b_owner]
    dst_slot_b = take_a[b_owner] + rank_in_runs(b_owner)
    _put(a, dst_rows_a, dst_slot_a, data_a)
    _put(a, dst_rows_b, dst_slot_b, data_b)
    a.filled[rows_a] = m

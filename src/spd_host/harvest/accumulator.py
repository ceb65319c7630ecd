"""The harvest's running state and its per-batch update.

Definitions (per component ``c``; ``N`` = tokens seen; "fires" = ``firings[site][b, s, c]``):

- ``firing_count[c]``: number of token positions where ``c`` fires (int64, exact).
  ``density = firing_count / N``.
- ``sum_all[type][c]``: sum of the activation over *all* tokens; ``mean_all = sum_all / N``.
- ``sum_firing[type][c]``: sum over firing tokens; ``mean_firing = sum_firing / firing_count``.
  Both sums are accumulated exactly in int64 fixed point (``ExactSum``): every activation is
  quantised to ``2**-32`` on its own and added as an integer, so results do not depend on
  sharding, resume, batch size or device.
- ``max_firing[type][c]``: max over firing tokens (``-inf`` if it never fired; exact).
- ``hist[c]``: counts (int64) of ``|primary activation|`` at firing tokens in log-spaced bins
  between ``histogram_min`` and ``histogram_max``; bin 0 is ``[0, min)``, the last bin is
  ``[max, inf)``; bin ``i`` is ``[edge[i-1], edge[i])``.
- ``input pairs (c, t)``: number of positions where ``c`` fires and the *current* token is
  ``t`` (int64, exact). ``token_count[t]``: occurrences of ``t`` as current token (exact).
- ``output pairs (c, t)``: sum, over positions where ``c`` fires, of the model's next-token
  probability of ``t``, keeping only the ``output_top_k`` most likely tokens per position
  whose probability is at least ``output_min_prob``
  (int64 in units of ``2**-30``). ``output_kept_mass[c]``: the kept probability summed over
  ``c``'s firing positions, so for every token
  ``0 <= exact - stored <= firing_count[c] - output_kept_mass[c]`` (plus quantisation,
  ``<= 2**-31`` per position). ``next_token_mass[t]``: the same sum over all positions.
- ``co-occurrence pairs (i, j), i < j``: number of positions where both fire (int64, exact over
  the ``cooc_n_tokens`` sampled positions, see ``cooccurrence_fraction``; ``cooc_count[c]``
  counts firings over the same positions).
- examples: reservoir sample and top-K by primary activation (see ``examples``).

Every per-batch accumulation runs on the harvest device (``config.device``): the batch's
tensors are moved there (a no-op when the plugin computed them there), each site is reduced
to its firing entries (``entries``), and all state lives there. Only ``state()`` (checkpoints,
results) copies to the host. Random draws come from CPU generators seeded by
``(seed, global batch)`` and are copied to the device, so every device draws the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spd_host.adapter import HarvestBatch, Site
from spd_host.errors import HarvestBatchError
from spd_host.harvest.config import HarvestConfig
from spd_host.harvest.cooccurrence import count_batch
from spd_host.harvest.entries import SiteEntries, site_entries
from spd_host.harvest.exact import (
    PROB_FRAC_BITS,
    ExactSum,
    quantize,
    split_fixed,
    split_fixed_bounded,
)
from spd_host.harvest.examples import ExampleBank, reservoir_plan, topk_plan
from spd_host.harvest.next_token import next_token_topk
from spd_host.harvest.sparse_counts import DensePairCounter, SparsePairCounter, pair_counter
from spd_host.harvest.windows import extract_windows

SUM_FRAC_BITS = 32
PRUNE_EVERY = 16  # batches between checks of token_table_max_pairs
_DENSE_SUM_CHUNK = 1 << 22  # elements quantised at once by the dense all-position sum


@dataclass(frozen=True)
class Layout:
    """Sites in order, with the global index offset of each site's components."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    act_types: tuple[str, ...]

    @classmethod
    def of(cls, sites: Sequence[Site], act_types: Sequence[str]) -> Layout:
        return cls(
            tuple(s.name for s in sites), tuple(s.n_components for s in sites), tuple(act_types)
        )

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.sizes:
            out.append(acc)
            acc += n
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def key(self, g: int) -> str:
        for name, off, n in zip(self.names, self.offsets, self.sizes, strict=True):
            if off <= g < off + n:
                return f"{name}:{g - off}"
        raise IndexError(g)

    def index(self, key: str) -> int:
        site, _, idx = key.rpartition(":")
        if (
            site not in self.names
            or not idx.isdigit()
            or int(idx) >= self.sizes[self.names.index(site)]
        ):
            raise KeyError(key)
        return self.offsets[self.names.index(site)] + int(idx)

    def as_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "sizes": list(self.sizes),
            "act_types": list(self.act_types),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(tuple(d["names"]), tuple(d["sizes"]), tuple(d["act_types"]))


def add_dense_sum_all(out: ExactSum, t: int, off: int, a: torch.Tensor) -> None:
    """Add the exact sum over all positions of activation ``a`` ``[N, C]`` to ``out[t, off:]``.

    Only non-zero entries contribute; every entry is quantised on its own (a sparse pass over
    ``nonzero()`` when few are non-zero, else row chunks of the dense tensor with the two limbs
    summed per column), so the result is the same exact integer whatever the device, the
    order or the split. (When every non-zero sits at a firing the caller uses the firing sum
    instead: the same integer, no pass over the dense tensor.)
    """
    N, C = a.shape
    nnz = int(torch.count_nonzero(a))
    if nnz == 0:
        return
    base = t * out.hi.shape[-1] + off
    if nnz * 4 < a.numel():
        n, c = a.nonzero().unbind(1)
        q, fine = split_fixed(a[n, c], SUM_FRAC_BITS)
        out.index_add_(c + base, q, max_per_entry=N, fine=fine)
        return
    step = max(1, _DENSE_SUM_CHUNK // max(C, 1))
    hi_sum = torch.zeros(C, dtype=torch.int64, device=a.device)
    lo_sum = torch.zeros(C, dtype=torch.int64, device=a.device)
    fine_sum = torch.zeros(C, dtype=torch.int64, device=a.device)
    for r0 in range(0, N, step):
        q, fine = split_fixed(a[r0 : r0 + step], SUM_FRAC_BITS)
        hi = torch.div(q, 1 << 40, rounding_mode="floor")
        hi_sum += hi.sum(0)
        lo_sum += (q - hi * (1 << 40)).sum(0)
        fine_sum += fine.sum(0)
    idx = torch.arange(C, device=a.device) + base
    out.index_add_(idx, lo_sum, max_per_entry=N, fine=fine_sum)
    out.hi.view(-1).index_add_(0, idx, hi_sum)


def batch_generator(seed: int, global_batch: int) -> torch.Generator:
    """Per-batch RNG, a pure function of ``(seed, global batch index)`` (resume-safe)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + global_batch * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class HarvestAccumulator:
    """All per-component statistics of a harvest, updated one HarvestBatch at a time.

    ``device``: where the state lives and every update runs (default: ``config.device``).
    """

    def __init__(
        self,
        layout: Layout,
        config: HarvestConfig,
        vocab_size: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.V = vocab_size
        dev = self.device = torch.device(device if device is not None else config.device)
        C = layout.total
        T = len(layout.act_types)
        self.n_tokens = 0
        self.n_batches = 0
        self.firing_count = torch.zeros(C, dtype=torch.int64, device=dev)
        self.sum_all = ExactSum((T, C), SUM_FRAC_BITS, dev)
        self.sum_firing = ExactSum((T, C), SUM_FRAC_BITS, dev)
        self.max_firing = torch.full((T, C), float("-inf"), dtype=torch.float32, device=dev)
        nb = config.histogram_bins
        self.hist_edges = torch.logspace(
            math.log10(config.histogram_min),
            math.log10(config.histogram_max),
            nb + 1,
            dtype=torch.float64,
        ).to(torch.float32)
        self._edges_dev = self.hist_edges.to(dev)
        self.hist = torch.zeros(C, nb + 2, dtype=torch.int64, device=dev)
        self.token_count = torch.zeros(vocab_size, dtype=torch.int64, device=dev)
        # probability masses: int64 in units of 2**-PROB_FRAC_BITS (exact, order-independent)
        self.next_token_mass = torch.zeros(vocab_size, dtype=torch.int64, device=dev)
        self.kept_mass_total = torch.zeros((), dtype=torch.int64, device=dev)
        self.output_kept_mass = torch.zeros(C, dtype=torch.int64, device=dev)
        budget, bg = config.dense_table_bytes, config.background_merge
        self.input_pairs = pair_counter(
            C, vocab_size, dense_bytes=budget, device=dev, background=bg
        )
        self.output_pairs = pair_counter(
            C, vocab_size, dense_bytes=budget, device=dev, background=bg
        )
        self.cooc = pair_counter(C, C, dense_bytes=budget, device=dev, background=bg)
        # summed prune thresholds of the bounded token tables (token_table_max_pairs) before
        # this accumulator's tables counted their own (a loaded state's, merged shards')
        self.prune_base = {"input": 0, "output": 0}
        self.cooc_count = torch.zeros(C, dtype=torch.int64, device=dev)
        self.cooc_n_tokens = 0
        self.cooc_active = config.cooccurrence
        K, W = config.examples_per_component, config.window
        self.reservoir = ExampleBank(C, K, W, T, dev)
        self.top = ExampleBank(C, K, W, T, dev)

    # -- update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, batch: HarvestBatch, global_batch: int) -> None:
        cfg = self.config
        dev = self.device
        tokens = batch.tokens.to(dev, torch.int64)
        B, S = tokens.shape
        N = B * S
        flat_tok = tokens.reshape(N)
        lo, hi = torch.aminmax(flat_tok)
        if int(hi) >= self.V or int(lo) < 0:
            raise HarvestBatchError(
                f"token ids outside [0, {self.V}) in batch {global_batch}",
                hint="the dataset's tokenizer does not match the decomposition's vocabulary",
            )
        gen = batch_generator(cfg.seed, global_batch)
        self.token_count += torch.bincount(flat_tok, minlength=self.V)
        # next-token distribution, top-k per position (topk + logsumexp, no softmax)
        pv, pi = next_token_topk(batch, N, cfg.output_top_k, self.V, dev)
        # below the floor: dropped (zero weight; the pair is skipped), mass goes to the bound
        pv = torch.where(pv >= cfg.output_min_prob, pv, torch.zeros_like(pv))
        qv = quantize(pv, PROB_FRAC_BITS, check=False)
        kept = qv.sum(-1)
        next_token = (qv, pi, kept)
        self.next_token_mass.index_add_(0, pi.reshape(-1), qv.reshape(-1))
        self.kept_mass_total += kept.sum()
        # global token index; batch_size (not B) so a short last batch cannot collide
        pos_base = global_batch * cfg.batch_size * S
        all_n: list[torch.Tensor] = []
        all_g: list[torch.Tensor] = []
        all_v: list[torch.Tensor] = []
        all_m: list[torch.Tensor] = []  # [T, E]: the entry's value counts in the all-position sum
        # the same entries grouped by component (data order within): the token tables'
        # scatters then hit one table row at a time (cache-resident) instead of a random row
        # per entry; integer sums, so the order changes no bit
        by_n: list[torch.Tensor] = []
        by_g: list[torch.Tensor] = []
        sites = [
            (off, site_entries(batch, site, C, N, self.layout.act_types, dev))
            for site, off, C in zip(
                self.layout.names, self.layout.offsets, self.layout.sizes, strict=True
            )
        ]
        # bank rows for every component firing for the first time, all sites at once (one
        # growth per batch at most); every firing component enters both banks this batch
        fresh = torch.cat([e.c + off for off, e in sites])
        if fresh.numel():
            fresh = torch.unique(fresh[self.top.row_of[fresh] < 0])
            self.reservoir.rows_for(fresh)
            self.top.rows_for(fresh)
        for off, e in sites:
            n, cl = e.n, e.c
            g = cl + off
            from_firings = self._add_dense_sums(e, off, N)
            if n.numel() == 0:
                continue
            primary = e.values[0]
            b, s = torch.div(n, S, rounding_mode="floor"), n % S
            # examples first: the reservoir needs the firing counts from before this batch
            self._update_reservoir(tokens, e, b, s, cl, g, primary, pos_base + n, gen)
            self._update_top(tokens, e, b, s, cl, g, primary, pos_base + n)
            self.firing_count.index_add_(0, g, torch.ones_like(g))
            all_n.append(n)
            all_g.append(g)
            all_v.append(e.values)
            all_m.append(from_firings[:, None].expand(-1, n.shape[0]))
            order = e.by_component()[1]
            by_n.append(n.index_select(0, order))
            by_g.append(g.index_select(0, order))
        if all_n:
            self._update_per_component(
                torch.cat(all_n),
                torch.cat(all_g),
                torch.cat(all_v, 1),
                torch.cat(all_m, 1),
                flat_tok,
                next_token,
                N,
                (torch.cat(by_n), torch.cat(by_g)),
            )
        if self.cooc_active:
            keep = self._cooc_positions(global_batch, N)
            if keep is not None:
                sel = [keep[n] for n in all_n]
                all_n = [n[m] for n, m in zip(all_n, sel, strict=True)]
                all_g = [g[m] for g, m in zip(all_g, sel, strict=True)]
            self._update_cooc(all_n, all_g, N if keep is None else int(keep.sum()))
        self.n_tokens += N
        self.n_batches += 1
        if cfg.token_table_max_pairs is not None and self.n_batches % PRUNE_EVERY == 0:
            self._prune_token_tables(cfg.token_table_max_pairs)

    def _prune_token_tables(self, cap: int) -> None:
        """Bound the sparse token tables (at fixed batch counts, so a resume prunes alike; a
        background table does it behind its merge, see ``SparsePairCounter.bound``)."""
        for table in (self.input_pairs, self.output_pairs):
            if isinstance(table, SparsePairCounter):
                table.bound(cap, cap // 2)

    @property
    def prune_bound(self) -> dict[str, int]:
        """Summed prune thresholds per token table: how much any stored or missing count may
        be below the exact one."""
        out = dict(self.prune_base)
        for name, table in (("input", self.input_pairs), ("output", self.output_pairs)):
            if isinstance(table, SparsePairCounter):
                out[name] += table.pruned_total()
        return out

    def _update_per_component(
        self,
        n: torch.Tensor,
        g: torch.Tensor,
        values: torch.Tensor,
        in_all: torch.Tensor,
        flat_tok: torch.Tensor,
        next_token: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        N: int,
        by_component: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """Sums, maxima, histogram and token tables over every site's firing entries at once.

        ``in_all`` ``[T, E]``: entries whose value also goes into the all-position sum (types
        whose non-zeros all sit at firings; the others were summed densely per site).
        ``next_token``: ``(masses [N, k], token ids [N, k], kept mass [N])``.
        ``by_component``: the same entries' ``(n, g)`` grouped by component, for the token
        tables (the same integer sums in a cache-friendly order).
        """
        qv, pi, kept = next_token
        T, C_all = values.shape[0], self.layout.total
        q, fine, small = split_fixed_bounded(values, SUM_FRAC_BITS)  # [T, E] each
        idx = torch.arange(T, device=g.device)[:, None] * C_all + g[None, :]
        self.sum_firing.index_add_(
            idx.reshape(-1), q.reshape(-1), max_per_entry=N, fine=fine.reshape(-1), small=small
        )
        if not bool(in_all.all()):
            self.sum_all.index_add_(
                idx[in_all], q[in_all], max_per_entry=N, fine=fine[in_all], small=small
            )
        else:
            self.sum_all.index_add_(
                idx.reshape(-1), q.reshape(-1), max_per_entry=N, fine=fine.reshape(-1), small=small
            )
        idx = idx.reshape(-1)
        self.max_firing.view(-1).scatter_reduce_(0, idx, values.reshape(-1), "amax")
        bins = torch.bucketize(values[0].abs(), self._edges_dev, right=True)
        self.hist.view(-1).index_add_(0, g * self.hist.shape[1] + bins, torch.ones_like(g))
        self.output_kept_mass.index_add_(0, g, kept.index_select(0, n))
        n, g = by_component
        self.input_pairs.add(g, flat_tok.index_select(0, n))
        # output pairs: one row gather of the position's top-k per firing entry, keys made in
        # place, one scatter (measured: cheaper than compacting the zero-weight slots first,
        # as most are kept)
        keys = pi.index_select(0, n)
        keys += (g * self.V)[:, None]
        w = qv.index_select(0, n).reshape(-1)
        keys = keys.reshape(-1)
        if isinstance(self.output_pairs, DensePairCounter):
            self.output_pairs.add_keys(keys, w)  # zero weights add nothing
        else:
            nz = w > 0
            self.output_pairs.add_keys(keys[nz], w[nz])

    def _add_dense_sums(self, e: SiteEntries, off: int, N: int) -> torch.Tensor:
        """All-position sums of a site's types whose non-zeros are not all at firings.

        Returns ``[T]`` bool: the types whose all-position sum is their firing sum (every type
        of a sparse site, by contract; a dense type when one ``count_nonzero`` says so); the
        others are summed here, exactly, over the dense tensor.
        """
        T = e.values.shape[0]
        if e.dense_acts is None:
            return torch.ones(T, dtype=torch.bool, device=self.device)
        out = []
        for t, a in enumerate(e.dense_acts):
            same = int(torch.count_nonzero(a)) == int(torch.count_nonzero(e.values[t]))
            if not same:
                add_dense_sum_all(self.sum_all, t, off, a)
            out.append(same)
        return torch.tensor(out, dtype=torch.bool, device=self.device)

    def _update_reservoir(self, tokens, e, b, s, cl, g, primary, pos, gen) -> None:  # type: ignore[no-untyped-def]
        bank = self.reservoir
        ev, slot = reservoir_plan(g, self.firing_count[g], bank.k, gen, e.by_component()[1])
        if ev.numel() == 0:
            return
        rows = bank.row_of[g[ev]]  # assigned in update() for components firing first now
        if bool((rows < 0).any()):  # not reached while both banks hold the same components
            rows = bank.rows_for(torch.unique(g[ev]))[torch.unique(g[ev], return_inverse=True)[1]]
        w = extract_windows(tokens, e, b[ev], s[ev], cl[ev], self.config.context_tokens)
        bank.write(rows, slot, primary[ev], pos[ev], w)
        bank.filled.scatter_reduce_(0, rows, slot + 1, "amax")

    def _update_top(self, tokens, e, b, s, cl, g, primary, pos) -> None:  # type: ignore[no-untyped-def]
        bank = self.top
        rows, slots, ev, touched, filled = topk_plan(g, primary, pos, bank)
        if rows.numel() == 0:
            return
        w = extract_windows(tokens, e, b[ev], s[ev], cl[ev], self.config.context_tokens)
        # entering events take free slots or those of the entries they push out; no kept
        # entry moves (rows are unordered, ranked at the result write)
        bank.write(rows, slots, primary[ev], pos[ev], w)
        bank.filled[touched] = filled

    def _cooc_positions(self, global_batch: int, N: int) -> torch.Tensor | None:
        """Positions of this batch counted for co-occurrence (None: all of them).

        A function of (seed, global batch) only, from its own generator stream, so the sample is
        the same under any sharding, resume or device and does not disturb the reservoir's draws.
        """
        frac = self.config.cooccurrence_fraction
        if frac >= 1.0:
            return None
        gen = batch_generator(self.config.seed + 0x5EED, global_batch)
        return (torch.rand(N, generator=gen) < frac).to(self.device)

    def _update_cooc(
        self, all_n: list[torch.Tensor], all_g: list[torch.Tensor], n_counted: int
    ) -> None:
        C = self.layout.total
        if all_n:
            n = torch.cat(all_n)
            g = torch.cat(all_g)
            self.cooc_count.index_add_(0, g, torch.ones_like(g))
            count_batch(self.cooc, n, g, C)
        self.cooc_n_tokens += n_counted
        # the exact distinct count is needed only when the cheap upper bound passes the limit
        cap = self.config.cooccurrence_max_pairs
        if isinstance(self.cooc, DensePairCounter) and cap >= C * (C - 1) // 2:
            return  # the table can never hold more distinct pairs than the limit
        if self.cooc.upper_len() > cap and self.cooc.distinct_len() > cap:
            self.cooc_active = False

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Host (CPU) copies of the whole state, and the JSON-able rest."""
        bound = self.prune_bound
        t: dict[str, torch.Tensor] = {
            "firing_count": self.firing_count,
            "max_firing": self.max_firing,
            "hist": self.hist,
            "hist_edges": self.hist_edges,
            "token_count": self.token_count,
            "next_token_mass": self.next_token_mass,
            "kept_mass_total": self.kept_mass_total.reshape(1),
            "output_kept_mass": self.output_kept_mass,
            "cooc_count": self.cooc_count,
            "prune_bound": torch.tensor([bound["input"], bound["output"]]),
        }
        t.update(self.sum_all.state("sum_all"))
        t.update(self.sum_firing.state("sum_firing"))
        t.update(self.input_pairs.state("input_pairs"))
        t.update(self.output_pairs.state("output_pairs"))
        t.update(self.cooc.state("cooc"))
        t.update(self.reservoir.state("reservoir"))
        t.update(self.top.state("top"))
        meta = {
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "vocab_size": self.V,
            "cooc_n_tokens": self.cooc_n_tokens,
            "cooc_active": self.cooc_active,
            "layout": self.layout.as_json(),
            "config": self.config.model_dump(mode="json"),
        }
        return {k: v.detach().to("cpu").contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        device: torch.device | str | None = None,
    ) -> HarvestAccumulator:
        config = HarvestConfig(**meta["config"])
        acc = cls(Layout.from_json(meta["layout"]), config, int(meta["vocab_size"]), device)
        dev = acc.device
        acc.sum_all.load_state("sum_all", tensors)
        acc.sum_firing.load_state("sum_firing", tensors)
        for name in (
            "firing_count",
            "max_firing",
            "hist",
            "token_count",
            "next_token_mass",
            "output_kept_mass",
            "cooc_count",
        ):
            setattr(acc, name, tensors[name].to(dev).clone())
        acc.kept_mass_total = tensors["kept_mass_total"].reshape(()).to(dev).clone()
        pb = tensors.get("prune_bound")  # absent in states written before bounded tables
        if pb is not None:
            acc.prune_base = {"input": int(pb[0]), "output": int(pb[1])}
        acc.input_pairs.load_state("input_pairs", tensors)
        acc.output_pairs.load_state("output_pairs", tensors)
        acc.cooc.load_state("cooc", tensors)
        acc.reservoir.load_state("reservoir", tensors)
        acc.top.load_state("top", tensors)
        acc.n_tokens = int(meta["n_tokens"])
        acc.n_batches = int(meta["n_batches"])
        acc.cooc_n_tokens = int(meta["cooc_n_tokens"])
        acc.cooc_active = bool(meta["cooc_active"])
        return acc

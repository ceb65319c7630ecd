"""The harvest's running state and its per-batch update.

Definitions (per component ``c``; ``N`` = tokens seen; "fires" = ``firings[site][b, s, c]``):

- ``firing_count[c]``: number of token positions where ``c`` fires (int64, exact).
  ``density = firing_count / N``.
- ``sum_all[type][c]``: sum of the activation over *all* tokens; ``mean_all = sum_all / N``.
- ``sum_firing[type][c]``: sum over firing tokens; ``mean_firing = sum_firing / firing_count``.
  Both sums are accumulated exactly in int64 fixed point (``ExactSum``): each batch's float64
  partial sum is quantised to ``2**-32`` once, so results do not depend on sharding or resume.
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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spd_host.adapter import HarvestBatch, Site
from spd_host.harvest.config import HarvestConfig
from spd_host.harvest.exact import PROB_FRAC_BITS, ExactSum, quantize
from spd_host.harvest.examples import ExampleBank, reservoir_plan, topk_plan
from spd_host.harvest.sparse_counts import SparsePairCounter
from spd_host.harvest.windows import extract_windows

_MAX_PAIRS_PER_CHUNK = 1 << 24


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


def _add_sum_all(
    out: torch.Tensor,
    a: torch.Tensor,
    v: torch.Tensor,
    v64: torch.Tensor,
    g: torch.Tensor,
    off: int,
) -> None:
    """Add this batch's float64 sum over all positions of ``a`` ``[N, C]`` into ``out[off:]``.

    Only non-zero entries contribute, so the sum is taken over them: when every non-zero
    activation is at a firing position (``v`` are the firing values, ``g`` their global
    components) it equals the firing sum, with no pass over the dense tensor beyond one count;
    a sparse tensor is summed over its non-zeros; a dense one by a column reduction. All three are
    exact float64 sums of the same float32 terms (only the order differs), so the documented
    bound is unchanged.
    """
    C = a.shape[1]
    nnz = int(torch.count_nonzero(a))
    if nnz == int(torch.count_nonzero(v)):
        out.index_add_(0, g, v64)
    elif nnz * 4 < a.numel():
        nz = a.nonzero()
        out.index_add_(0, nz[:, 1] + off, a[nz[:, 0], nz[:, 1]].to(torch.float64))
    else:
        out[off : off + C] += a.sum(0, dtype=torch.float64)


def batch_generator(seed: int, global_batch: int) -> torch.Generator:
    """Per-batch RNG, a pure function of ``(seed, global batch index)`` (resume-safe)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + global_batch * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class HarvestAccumulator:
    """All per-component statistics of a harvest, updated one HarvestBatch at a time."""

    def __init__(self, layout: Layout, config: HarvestConfig, vocab_size: int) -> None:
        self.layout = layout
        self.config = config
        self.V = vocab_size
        C = layout.total
        T = len(layout.act_types)
        self.n_tokens = 0
        self.n_batches = 0
        self.firing_count = torch.zeros(C, dtype=torch.int64)
        self.sum_all = ExactSum((T, C))
        self.sum_firing = ExactSum((T, C))
        self.max_firing = torch.full((T, C), float("-inf"), dtype=torch.float32)
        nb = config.histogram_bins
        self.hist_edges = torch.logspace(
            math.log10(config.histogram_min),
            math.log10(config.histogram_max),
            nb + 1,
            dtype=torch.float64,
        ).to(torch.float32)
        self.hist = torch.zeros(C, nb + 2, dtype=torch.int64)
        self.token_count = torch.zeros(vocab_size, dtype=torch.int64)
        # probability masses: int64 in units of 2**-PROB_FRAC_BITS (exact, order-independent)
        self.next_token_mass = torch.zeros(vocab_size, dtype=torch.int64)
        self.kept_mass_total = torch.zeros((), dtype=torch.int64)
        self.output_kept_mass = torch.zeros(C, dtype=torch.int64)
        self.input_pairs = SparsePairCounter(C, vocab_size, dtype=torch.int64)
        self.output_pairs = SparsePairCounter(C, vocab_size, dtype=torch.int64)
        self.cooc = SparsePairCounter(C, C, dtype=torch.int64)
        self.cooc_count = torch.zeros(C, dtype=torch.int64)
        self.cooc_n_tokens = 0
        self.cooc_active = config.cooccurrence
        K, W = config.examples_per_component, config.window
        self.reservoir = ExampleBank(C, K, W, T)
        self.top = ExampleBank(C, K, W, T)

    # -- update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, batch: HarvestBatch, global_batch: int) -> None:
        cfg = self.config
        tokens = batch.tokens.to(torch.int64).cpu()
        B, S = tokens.shape
        N = B * S
        flat_tok = tokens.reshape(N)
        if int(flat_tok.max()) >= self.V or int(flat_tok.min()) < 0:
            raise ValueError(f"token ids outside [0, {self.V}) in batch {global_batch}")
        gen = batch_generator(cfg.seed, global_batch)
        self.token_count += torch.bincount(flat_tok, minlength=self.V)
        # next-token distribution, top-k per position
        pv, pi = self._next_token_topk(batch, N)
        qv = quantize(pv, PROB_FRAC_BITS)
        kept = qv.sum(-1)
        self.next_token_mass.index_add_(0, pi.reshape(-1), qv.reshape(-1))
        self.kept_mass_total += kept.sum()
        T = len(self.layout.act_types)
        C_all = self.layout.total
        batch_sum_all = torch.zeros(T, C_all, dtype=torch.float64)
        batch_sum_firing = torch.zeros(T, C_all, dtype=torch.float64)
        # global token index; batch_size (not B) so a short last batch cannot collide
        pos_base = global_batch * self.config.batch_size * S
        all_n: list[torch.Tensor] = []
        all_g: list[torch.Tensor] = []
        for site, off, C in zip(
            self.layout.names, self.layout.offsets, self.layout.sizes, strict=True
        ):
            fired = batch.firings[site].cpu()
            acts = {t: batch.activations[site][t].cpu() for t in self.layout.act_types}
            nz = fired.reshape(N, C).nonzero()
            n, cl = nz[:, 0], nz[:, 1]
            g = cl + off
            for i, t in enumerate(self.layout.act_types):
                a = acts[t].reshape(N, C)
                v = a[n, cl]
                v64 = v.to(torch.float64)
                batch_sum_firing[i].index_add_(0, g, v64)
                _add_sum_all(batch_sum_all[i], a, v, v64, g, off)
                self.max_firing[i].scatter_reduce_(0, g, v.to(torch.float32), "amax")
                if i == 0:
                    primary = v
            if n.numel() == 0:
                continue
            b, s = n // S, n % S
            # examples first: the reservoir needs the firing counts from before this batch
            self._update_reservoir(tokens, fired, acts, b, s, cl, g, primary, pos_base + n, gen)
            self._update_top(tokens, fired, acts, b, s, cl, g, primary, pos_base + n)
            self.firing_count.index_add_(0, g, torch.ones_like(g))
            bins = torch.bucketize(primary.abs().to(torch.float32), self.hist_edges, right=True)
            self.hist.view(-1).index_add_(0, g * self.hist.shape[1] + bins, torch.ones_like(g))
            self.input_pairs.add(g, flat_tok[n])
            self.output_kept_mass.index_add_(0, g, kept[n])
            w = qv[n].reshape(-1)
            nz = w > 0
            self.output_pairs.add_keys((g[:, None] * self.V + pi[n]).reshape(-1)[nz], w[nz])
            all_n.append(n)
            all_g.append(g)
        self.sum_all.add_(batch_sum_all)
        self.sum_firing.add_(batch_sum_firing)
        if self.cooc_active:
            keep = self._cooc_positions(global_batch, N)
            if keep is not None:
                sel = [keep[n] for n in all_n]
                all_n = [n[m] for n, m in zip(all_n, sel, strict=True)]
                all_g = [g[m] for g, m in zip(all_g, sel, strict=True)]
            self._update_cooc(all_n, all_g, N, N if keep is None else int(keep.sum()))
        self.n_tokens += N
        self.n_batches += 1

    def _next_token_topk(self, batch: HarvestBatch, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(self.config.output_top_k, self.V)
        if batch.next_token_probs is not None:
            p = batch.next_token_probs.cpu().reshape(N, -1).to(torch.float32)
        elif batch.next_token_logits is not None:
            p = torch.softmax(batch.next_token_logits.cpu().reshape(N, -1).to(torch.float32), -1)
        else:
            return torch.zeros(N, 0), torch.zeros(N, 0, dtype=torch.int64)
        if p.shape[1] != self.V:
            raise ValueError(f"next-token tensor has {p.shape[1]} classes, expected vocab {self.V}")
        pv, pi = torch.topk(p, k, dim=-1, sorted=False)
        # below the floor: dropped (zero weight; the pair is skipped), mass goes to the bound
        pv = torch.where(pv >= self.config.output_min_prob, pv, torch.zeros_like(pv))
        return pv, pi

    def _update_reservoir(self, tokens, fired, acts, b, s, cl, g, primary, pos, gen) -> None:  # type: ignore[no-untyped-def]
        bank = self.reservoir
        ev, slot = reservoir_plan(g, self.firing_count[g], bank.k, gen)
        if ev.numel() == 0:
            return
        bank.rows_for(torch.unique(g[ev]))  # allocate rows for components firing first now
        rows = bank.row_of[g[ev]]
        w = extract_windows(
            tokens,
            fired,
            acts,
            self.layout.act_types,
            b[ev],
            s[ev],
            cl[ev],
            self.config.context_tokens,
        )
        bank.write(rows, slot, primary[ev], pos[ev], w)
        bank.filled.scatter_reduce_(0, rows, slot + 1, "amax")

    def _update_top(self, tokens, fired, acts, b, s, cl, g, primary, pos) -> None:  # type: ignore[no-untyped-def]
        bank = self.top
        rows, slots, is_new, src, _score = topk_plan(g, primary, pos, bank)
        if rows.numel() == 0:
            return
        old = ~is_new
        # gather the surviving old entries before anything is overwritten
        o_rows, o_src = rows[old], src[old]
        kept = {
            f: getattr(bank, f)[o_rows, o_src].clone()
            for f in ("score", "pos", "tokens", "acts", "fired")
        }
        ev = src[is_new]
        w = extract_windows(
            tokens,
            fired,
            acts,
            self.layout.act_types,
            b[ev],
            s[ev],
            cl[ev],
            self.config.context_tokens,
        )
        bank.write(rows[is_new], slots[is_new], primary[ev], pos[ev], w)
        for f, t in kept.items():
            getattr(bank, f)[o_rows, slots[old]] = t
        new_filled = torch.zeros_like(bank.filled).scatter_reduce_(0, rows, slots + 1, "amax")
        touched = torch.unique(rows)
        bank.filled[touched] = new_filled[touched]

    def _cooc_positions(self, global_batch: int, N: int) -> torch.Tensor | None:
        """Positions of this batch counted for co-occurrence (None: all of them).

        A function of (seed, global batch) only, from its own generator stream, so the sample is
        the same under any sharding or resume and does not disturb the reservoir's draws.
        """
        frac = self.config.cooccurrence_fraction
        if frac >= 1.0:
            return None
        gen = batch_generator(self.config.seed + 0x5EED, global_batch)
        return torch.rand(N, generator=gen) < frac

    def _update_cooc(
        self, all_n: list[torch.Tensor], all_g: list[torch.Tensor], N: int, n_counted: int
    ) -> None:
        C = self.layout.total
        if all_n:
            n = torch.cat(all_n)
            g = torch.cat(all_g)
            order = torch.sort(n * C + g).indices
            n, g = n[order], g[order]
            self.cooc_count.index_add_(0, g, torch.ones_like(g))
            counts = torch.bincount(n, minlength=N)
            ev_start = torch.cumsum(counts, 0) - counts
            # positions with the same number L of firing components share one triangle pattern:
            # their pairs are a gather of an [positions, L] matrix at triu_indices(L, L, 1)
            for L in torch.unique(counts[counts >= 2]).tolist():
                toks = (counts == L).nonzero().flatten()
                iu = torch.triu_indices(L, L, 1)
                step = max(1, _MAX_PAIRS_PER_CHUNK // (L * (L - 1) // 2))
                for s0 in range(0, toks.shape[0], step):
                    G = g[ev_start[toks[s0 : s0 + step]][:, None] + torch.arange(L)]
                    self.cooc.add_keys((G[:, iu[0]] * C + G[:, iu[1]]).reshape(-1))
        self.cooc_n_tokens += n_counted
        # the exact distinct count is needed only when the cheap upper bound passes the limit
        cap = self.config.cooccurrence_max_pairs
        if self.cooc.upper_len() > cap and len(self.cooc) > cap:
            self.cooc_active = False

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> HarvestAccumulator:
        acc = cls(
            Layout.from_json(meta["layout"]),
            HarvestConfig(**meta["config"]),
            int(meta["vocab_size"]),
        )
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
            setattr(acc, name, tensors[name].clone())
        acc.kept_mass_total = tensors["kept_mass_total"].reshape(()).clone()
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

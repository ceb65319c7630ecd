"""The harvest's running state and its per-batch update.

Definitions (per component ``c``; ``N`` = tokens seen; "fires" = ``firings[site][b, s, c]``):

- ``firing_count[c]``: number of token positions where ``c`` fires (int64, exact).
  ``density = firing_count / N``.
- ``sum_all[type][c]``: sum of the activation over *all* tokens (float64); ``mean_all = sum_all / N``.
- ``sum_firing[type][c]``: sum over firing tokens; ``mean_firing = sum_firing / firing_count``.
- ``max_firing[type][c]``: max over firing tokens (``-inf`` if it never fired).
- ``hist[c]``: counts (int64) of ``|primary activation|`` at firing tokens in log-spaced bins
  between ``histogram_min`` and ``histogram_max``; bin 0 is ``[0, min)``, the last bin is
  ``[max, inf)``.
- ``input pairs (c, t)``: number of positions where ``c`` fires and the *current* token is
  ``t`` (int64, exact). ``token_count[t]``: occurrences of ``t`` as current token.
- ``output pairs (c, t)``: sum, over positions where ``c`` fires, of the model's next-token
  probability of ``t``, keeping only the ``output_top_k`` most likely tokens per position
  (float64). ``output_kept_mass[c]``: sum over firing positions of the kept probability, so
  for every token ``0 <= true - stored <= firing_count[c] - output_kept_mass[c]``.
  ``next_token_mass[t]``: the same sum over all positions (marginal), with the global bound
  ``N - kept_mass_total``.
- ``co-occurrence pairs (i, j), i < j``: number of positions where both fire (int64, exact over
  the first ``cooc_n_tokens`` tokens; ``cooc_count[c]`` counts firings over the same tokens).
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
        return cls(tuple(s.name for s in sites), tuple(s.n_components for s in sites), tuple(act_types))

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
        if site not in self.names or not idx.isdigit() or int(idx) >= self.sizes[self.names.index(site)]:
            raise KeyError(key)
        return self.offsets[self.names.index(site)] + int(idx)

    def as_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "sizes": list(self.sizes), "act_types": list(self.act_types)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(tuple(d["names"]), tuple(d["sizes"]), tuple(d["act_types"]))


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
        self.sum_all = torch.zeros(T, C, dtype=torch.float64)
        self.sum_firing = torch.zeros(T, C, dtype=torch.float64)
        self.max_firing = torch.full((T, C), float("-inf"), dtype=torch.float32)
        nb = config.histogram_bins
        self.hist_edges = torch.logspace(
            math.log10(config.histogram_min), math.log10(config.histogram_max), nb + 1, dtype=torch.float64
        ).to(torch.float32)
        self.hist = torch.zeros(C, nb + 2, dtype=torch.int64)
        self.token_count = torch.zeros(vocab_size, dtype=torch.int64)
        self.next_token_mass = torch.zeros(vocab_size, dtype=torch.float64)
        self.kept_mass_total = torch.zeros((), dtype=torch.float64)
        self.output_kept_mass = torch.zeros(C, dtype=torch.float64)
        self.input_pairs = SparsePairCounter(C, vocab_size, dtype=torch.int64)
        self.output_pairs = SparsePairCounter(C, vocab_size, dtype=torch.float64)
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
        kept = pv.sum(-1, dtype=torch.float64)
        self.next_token_mass.index_add_(0, pi.reshape(-1), pv.reshape(-1).to(torch.float64))
        self.kept_mass_total += kept.sum()
        pos_base = global_batch * B * S
        all_n: list[torch.Tensor] = []
        all_g: list[torch.Tensor] = []
        for site, off, C in zip(self.layout.names, self.layout.offsets, self.layout.sizes, strict=True):
            fired = batch.firings[site].cpu()
            acts = {t: batch.activations[site][t].cpu() for t in self.layout.act_types}
            nz = fired.reshape(N, C).nonzero()
            n, cl = nz[:, 0], nz[:, 1]
            g = cl + off
            for i, t in enumerate(self.layout.act_types):
                a = acts[t].reshape(N, C)
                self.sum_all[i, off : off + C] += a.sum(0, dtype=torch.float64)
                v = a[n, cl]
                self.sum_firing[i].index_add_(0, g, v.to(torch.float64))
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
            k = pi.shape[1]
            self.output_pairs.add_keys(
                (g[:, None] * self.V + pi[n]).reshape(-1), pv[n].reshape(-1).to(torch.float64)
            )
            del k
            all_n.append(n)
            all_g.append(g)
        if self.cooc_active:
            self._update_cooc(all_n, all_g, N)
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
        return pv, pi

    def _update_reservoir(self, tokens, fired, acts, b, s, cl, g, primary, pos, gen) -> None:  # type: ignore[no-untyped-def]
        bank = self.reservoir
        ev, slot = reservoir_plan(g, self.firing_count[g], bank.k, gen)
        if ev.numel() == 0:
            return
        rows = bank.rows_for(torch.unique(g[ev]))
        del rows
        rows = bank.row_of[g[ev]]
        w = extract_windows(tokens, fired, acts, self.layout.act_types, b[ev], s[ev], cl[ev], self.config.context_tokens)
        bank.write(rows, slot, primary[ev], pos[ev], w)
        bank.filled[rows] = torch.maximum(bank.filled[rows], slot + 1)

    def _update_top(self, tokens, fired, acts, b, s, cl, g, primary, pos) -> None:  # type: ignore[no-untyped-def]
        bank = self.top
        rows, slots, is_new, src, score = topk_plan(g, primary, bank)
        if rows.numel() == 0:
            return
        old = ~is_new
        # gather the surviving old entries before anything is overwritten
        o_rows, o_src = rows[old], src[old]
        kept = {f: getattr(bank, f)[o_rows, o_src].clone() for f in ("score", "pos", "tokens", "acts", "fired")}
        ev = src[is_new]
        w = extract_windows(tokens, fired, acts, self.layout.act_types, b[ev], s[ev], cl[ev], self.config.context_tokens)
        bank.write(rows[is_new], slots[is_new], primary[ev], pos[ev], w)
        for f, t in kept.items():
            getattr(bank, f)[o_rows, slots[old]] = t
        new_filled = torch.zeros_like(bank.filled).scatter_reduce_(0, rows, slots + 1, "amax")
        touched = torch.unique(rows)
        bank.filled[touched] = new_filled[touched]

    def _update_cooc(self, all_n: list[torch.Tensor], all_g: list[torch.Tensor], N: int) -> None:
        C = self.layout.total
        if all_n:
            n = torch.cat(all_n)
            g = torch.cat(all_g)
            order = torch.sort(n * C + g).indices
            n, g = n[order], g[order]
            self.cooc_count.index_add_(0, g, torch.ones_like(g))
            counts = torch.bincount(n, minlength=N)
            pairs_per_token = counts * (counts - 1) // 2
            cum = torch.cumsum(pairs_per_token, 0)
            ev_start = torch.cumsum(counts, 0) - counts
            lo_tok = 0
            while lo_tok < N:
                base = int(cum[lo_tok - 1]) if lo_tok else 0
                hi_tok = int(torch.searchsorted(cum, torch.tensor(base + _MAX_PAIRS_PER_CHUNK), right=True))
                hi_tok = max(hi_tok, lo_tok + 1)
                hi_tok = min(hi_tok, N)
                e0 = int(ev_start[lo_tok])
                e1 = int(ev_start[hi_tok - 1] + counts[hi_tok - 1])
                self._pairs(n[e0:e1], g[e0:e1], counts, ev_start)
                lo_tok = hi_tok
        self.cooc_n_tokens += N
        self.cooc.consolidate()
        if len(self.cooc) > self.config.cooccurrence_max_pairs:
            self.cooc_active = False

    def _pairs(self, n: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, ev_start: torch.Tensor) -> None:
        if n.numel() < 2:
            return
        E = n.shape[0]
        first_ev = int(ev_start[n[0]])
        idx_in_group = torch.arange(E) + first_ev - ev_start[n]
        m = counts[n] - idx_in_group - 1
        P = int(m.sum())
        if P == 0:
            return
        first = torch.repeat_interleave(torch.arange(E), m)
        offs = torch.arange(P) - torch.repeat_interleave(torch.cumsum(m, 0) - m, m)
        second = first + 1 + offs
        self.cooc.add_keys(g[first] * self.layout.total + g[second])

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t: dict[str, torch.Tensor] = {
            "firing_count": self.firing_count,
            "sum_all": self.sum_all,
            "sum_firing": self.sum_firing,
            "max_firing": self.max_firing,
            "hist": self.hist,
            "hist_edges": self.hist_edges,
            "token_count": self.token_count,
            "next_token_mass": self.next_token_mass,
            "kept_mass_total": self.kept_mass_total.reshape(1),
            "output_kept_mass": self.output_kept_mass,
            "cooc_count": self.cooc_count,
        }
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
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> HarvestAccumulator:
        acc = cls(Layout.from_json(meta["layout"]), HarvestConfig(**meta["config"]), int(meta["vocab_size"]))
        for name in ("firing_count", "sum_all", "sum_firing", "max_firing", "hist", "token_count",
                     "next_token_mass", "output_kept_mass", "cooc_count"):
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

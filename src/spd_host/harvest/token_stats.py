"""Token and co-occurrence scores from stored counts (pure functions, no I/O)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from spd_host.harvest.models import TokenScore

CoocMetric = Literal["precision", "recall", "jaccard", "pmi"]


def token_lists(
    tokens: torch.Tensor,
    counts: torch.Tensor,
    token_total: torch.Tensor,
    n_c: float,
    n_tokens: int,
    *,
    top: int,
    min_support: int,
) -> dict[str, list[TokenScore]]:
    """Top PMI/precision/recall over co-occurring supported tokens, bottom PMI over supported
    tokens (supported: ``n(t) >= min_support``).

    Why the floor on the top lists too: a token seen once, at a firing, has precision 1 and the
    largest possible PMI, so without it the top lists are exact ties of one-off tokens. Ties
    are broken by the larger count (more evidence), then by token id (deterministic).

    ``tokens``/``counts``: the component's sparse row (tokens with ``n(c,t) > 0``);
    ``token_total``: dense ``n(t)`` over the vocabulary.
    """
    out: dict[str, list[TokenScore]] = {
        "top_pmi": [],
        "bottom_pmi": [],
        "top_precision": [],
        "top_recall": [],
    }
    if n_c <= 0 or n_tokens <= 0:
        return out
    counts = counts.to(torch.float64)
    tot = token_total.to(torch.float64)
    nt = tot[tokens]
    ok = (nt > 0) & (nt >= min_support)
    tokens, counts, nt = tokens[ok], counts[ok], nt[ok]

    def pack(
        idx: torch.Tensor,
        values: torch.Tensor,
        tok: torch.Tensor,
        cnt: torch.Tensor,
        tt: torch.Tensor,
    ) -> list[TokenScore]:
        return [
            TokenScore(
                token=int(tok[i]),
                value=float(values[i]),
                count=float(cnt[i]),
                token_total=float(tt[i]),
            )
            for i in idx.tolist()
        ]

    def best(
        values: torch.Tensor, tok: torch.Tensor, cnt: torch.Tensor, largest: bool = True
    ) -> torch.Tensor:
        # stable sorts from the last key to the first: value, then larger count, then token id
        o = torch.argsort(tok, stable=True)
        o = o[torch.argsort(cnt[o], descending=True, stable=True)]
        o = o[torch.argsort(values[o], descending=largest, stable=True)]
        return o[:top]

    if tokens.numel():
        pmi = torch.log(counts * n_tokens / (n_c * nt))
        out["top_pmi"] = pack(best(pmi, tokens, counts), pmi, tokens, counts, nt)
        prec = counts / nt
        out["top_precision"] = pack(best(prec, tokens, counts), prec, tokens, counts, nt)
        rec = counts / n_c
        out["top_recall"] = pack(best(rec, tokens, counts), rec, tokens, counts, nt)
    # bottom PMI: all tokens with enough support, zero co-occurrence included (+0.5 pseudo-count)
    supported = torch.nonzero(tot >= min_support).flatten()
    if supported.numel():
        dense = torch.zeros_like(tot)
        dense[tokens] = counts
        c_s, t_s = dense[supported], tot[supported]
        spmi = torch.log((c_s + 0.5) * n_tokens / (n_c * t_s))
        o = best(spmi, supported, c_s, largest=False)
        out["bottom_pmi"] = pack(o, spmi, supported, c_s, t_s)
    return out


def cooc_score(
    metric: CoocMetric, n_ij: torch.Tensor, n_i: float, n_j: torch.Tensor, m: int
) -> torch.Tensor:
    """Co-occurrence scores of component i with partners j over ``m`` tokens.

    precision = P(j | i) = n_ij / n_i; recall = P(i | j) = n_ij / n_j;
    jaccard = n_ij / (n_i + n_j - n_ij); pmi = log(n_ij m / (n_i n_j)).
    """
    n_ij = n_ij.to(torch.float64)
    n_j = n_j.to(torch.float64)
    if metric == "precision":
        return n_ij / n_i
    if metric == "recall":
        return n_ij / n_j
    if metric == "jaccard":
        return n_ij / (n_i + n_j - n_ij)
    if metric == "pmi":
        return torch.log(n_ij * m / (n_i * n_j))
    raise ValueError(f"unknown metric {metric!r}; use precision, recall, jaccard or pmi")


def safe_float(x: float) -> float | None:
    return None if not math.isfinite(x) else x

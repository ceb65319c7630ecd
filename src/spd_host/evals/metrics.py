"""Streaming accumulators for the fidelity metrics, exact over any number of batches.

Everything is summed in float64 on the CPU, batch by batch, so the final numbers do not depend
on the batch size (up to float32 rounding of the model's own outputs):

- next-token cross-entropy: mean over all (position, next position) pairs *inside* each
  sequence; the last position of a sequence has no target, and no pair crosses sequences;
- KL(clean || other): ``sum_v p_clean(v) (log p_clean(v) - log p_other(v))``, mean over every
  position (all positions have a prediction to compare, including the last);
- reconstruction at a write target: explained variance ``1 - SSE / SST`` where SST is the
  total sum of squares around the per-dimension mean over all eval tokens (merged across
  batches with Chan's parallel update), MSE per element, and mean per-token cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def next_token_ce_sum(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropies within each sequence, and the number of pairs.

    ``logits`` [B, S, V] predicts position t+1 at position t; only t < S-1 has a target.
    """
    S = tokens.shape[1]
    if S < 2:
        return 0.0, 0
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = tokens[:, 1:].reshape(-1)
    ce = F.cross_entropy(pred, target, reduction="none")
    return float(ce.double().sum()), int(target.numel())


def kl_sum(logp_clean: torch.Tensor, logits_other: torch.Tensor) -> tuple[float, int]:
    """Sum over positions of KL(clean || other); ``logp_clean`` already log-softmaxed."""
    logp_other = F.log_softmax(logits_other.float(), dim=-1)
    kl = (logp_clean.exp() * (logp_clean - logp_other)).sum(-1)
    return float(kl.double().sum()), int(kl.numel())


@dataclass
class MeanAccumulator:
    total: float = 0.0
    count: int = 0

    def add(self, pair: tuple[float, int]) -> None:
        self.total += pair[0]
        self.count += pair[1]

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


@dataclass
class ReconAccumulator:
    """Explained variance, MSE and cosine similarity of ``recon`` against ``target``."""

    n: int = 0
    mean: torch.Tensor | None = None  # [d] float64
    m2: float = 0.0  # sum of squared deviations from the running mean, over all dims
    sse: float = 0.0
    cos_sum: float = 0.0
    d: int = 0

    def add(self, target: torch.Tensor, recon: torch.Tensor) -> None:
        x = target.detach().reshape(-1, target.shape[-1]).to("cpu", torch.float64)
        y = recon.detach().reshape(-1, recon.shape[-1]).to("cpu", torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(0)
        m2_b = float(((x - mean_b) ** 2).sum())
        if self.mean is None:
            self.mean, self.m2, self.n, self.d = mean_b, m2_b, nb, x.shape[1]
        else:
            n = self.n + nb
            delta = mean_b - self.mean
            self.m2 += m2_b + float((delta**2).sum()) * self.n * nb / n
            self.mean = self.mean + delta * (nb / n)
            self.n = n
        self.sse += float(((x - y) ** 2).sum())
        self.cos_sum += float(F.cosine_similarity(x, y, dim=-1, eps=1e-12).sum())

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.sse / self.m2 if self.m2 > 0 else float("nan")

    @property
    def mse(self) -> float:
        return self.sse / (self.n * self.d) if self.n else float("nan")

    @property
    def cosine_similarity(self) -> float:
        return self.cos_sum / self.n if self.n else float("nan")


@dataclass
class SparsityAccumulator:
    """L0 (mean number of firing components per token) and which components ever fired."""

    n_components: int
    n_tokens: int = 0
    firing_total: int = 0
    fired: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.n_components, dtype=torch.bool)

    def add(self, firings: torch.Tensor) -> None:
        f = firings.reshape(-1, firings.shape[-1])
        self.n_tokens += f.shape[0]
        self.firing_total += int(f.sum())
        self.fired |= f.any(0).cpu()

    @property
    def l0(self) -> float:
        return self.firing_total / self.n_tokens if self.n_tokens else float("nan")


def recovered_score(ablated: float, spliced: float, clean: float) -> float | None:
    """``(ablated - spliced) / (ablated - clean)``: 1 = as good as clean, 0 = as bad as ablation.

    ``None`` when ablation does not change the quantity (the score is undefined).
    """
    denom = ablated - clean
    if denom == 0 or denom != denom:
        return None
    return (ablated - spliced) / denom

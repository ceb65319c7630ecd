"""Streaming accumulators for the fidelity metrics, exact over any number of batches.

Everything is summed in float64 on the CPU, batch by batch, so the final numbers do not depend
on the batch size (up to float32 rounding of the model's own outputs):

- next-token cross-entropy: mean over all (position, next position) pairs *inside* each
  sequence; the last position of a sequence has no target, and no pair crosses sequences;
- KL(clean || other): ``sum_v p_clean(v) (log p_clean(v) - log p_other(v))``, mean over every
  position (all positions have a prediction to compare, including the last);
- reconstruction at a write target: explained variance ``1 - SSE / SST`` where SST is the
  total sum of squares around the per-dimension mean over all eval tokens (merged across
  batches with Chan's parallel update), MSE per element (and SAELens' per-token sum), mean
  per-token cosine similarity, and SAELens' shrinkage numbers (``l2_ratio``,
  ``relative_reconstruction_bias``).

Every ``add`` takes an optional ``keep`` mask ([B, S] bool): the SAELens convention drops the
positions whose token is special (for CE: the pairs whose *input* token is special).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def next_token_ce_sum(
    logits: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[float, int]:
    """Sum of next-token cross-entropies within each sequence, and the number of pairs.

    ``logits`` [B, S, V] predicts position t+1 at position t; only t < S-1 has a target.
    With ``keep``, only pairs whose input position t is kept count.
    """
    S = tokens.shape[1]
    if S < 2:
        return 0.0, 0
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = tokens[:, 1:].reshape(-1)
    ce = F.cross_entropy(pred, target, reduction="none")
    if keep is not None:
        ce = ce[keep[:, :-1].reshape(-1).to(ce.device)]
    return float(ce.double().sum()), int(ce.numel())


def kl_sum(
    logp_clean: torch.Tensor, logits_other: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[float, int]:
    """Sum over positions of KL(clean || other); ``logp_clean`` already log-softmaxed."""
    logp_other = F.log_softmax(logits_other.float(), dim=-1)
    kl = (logp_clean.exp() * (logp_clean - logp_other)).sum(-1)
    if keep is not None:
        kl = kl[keep.to(kl.device)]
    return float(kl.double().sum()), int(kl.numel())


def ce_and_kl_sums(
    logp_clean: torch.Tensor,
    p_clean: torch.Tensor,
    logits: torch.Tensor,
    tokens: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[tuple[float, int], tuple[float, int]]:
    """``next_token_ce_sum`` and ``kl_sum`` of one forward from a single log-softmax (the
    vocabulary-wide work dominates a small model's eval); same definitions, same masks.

    The KL's ``p_clean * (logp_clean - logp)`` is computed in place in ``logp``'s buffer (after
    the CE has read it): the same products, bit for bit, without two fresh ``[B, S, V]``
    tensors, whose allocation (page faults on every new buffer) measured 3x the arithmetic."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if tokens.shape[1] >= 2:
        ce = -logp[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    else:
        ce = logp.new_zeros((tokens.shape[0], 0))
    kl = torch.sub(logp_clean, logp, out=logp).mul_(p_clean).sum(-1)
    if keep is not None:
        k = keep.to(kl.device)
        kl, ce = kl[k], ce[k[:, :-1]]
    return (float(ce.double().sum()), int(ce.numel())), (float(kl.double().sum()), int(kl.numel()))


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
class WeightedMean:
    """``sum_b w_b x_b / sum_b w_b``: Goodfire's per-batch means weighted by ``B*S``."""

    total: float = 0.0
    weight: float = 0.0

    def add(self, value: float, weight: float) -> None:
        self.total += value * weight
        self.weight += weight

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight else float("nan")


def _rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    x = t.detach().reshape(-1, t.shape[-1]).to("cpu", torch.float64)
    if keep is not None:
        x = x[keep.reshape(-1).cpu()]
    return x


@dataclass(frozen=True)
class CleanRows:
    """The clean side of a reconstruction comparison, in float64 rows, with the statistics
    every splice of one batch compares against (mean, sum of squared deviations, norms):
    computed once, not once per scope and variant."""

    x: torch.Tensor
    mean: torch.Tensor
    m2: float
    norm: torch.Tensor

    @classmethod
    def of(cls, target: torch.Tensor, keep: torch.Tensor | None = None) -> CleanRows:
        x = _rows(target, keep)
        if x.shape[0] == 0:
            return cls(x, x.new_zeros(x.shape[1]), 0.0, x.new_zeros(0))
        mean = x.mean(0)
        return cls(x, mean, float(((x - mean) ** 2).sum()), x.norm(dim=-1))


@dataclass
class ReconAccumulator:
    """Explained variance, MSE and cosine similarity of ``recon`` against ``target``."""

    n: int = 0
    mean: torch.Tensor | None = None  # [d] float64
    m2: float = 0.0  # sum of squared deviations from the running mean, over all dims
    sse: float = 0.0
    cos_sum: float = 0.0
    d: int = 0
    norm_in_sum: float = 0.0
    norm_out_sum: float = 0.0
    ratio_sum: float = 0.0
    rrb: list[float] = field(default_factory=list)  # one value per batch, as SAELens has it

    def add(
        self,
        target: torch.Tensor | CleanRows,
        recon: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> None:
        """``target``: the clean activations, or their :class:`CleanRows` (computed once per
        batch and target when several splices are compared against the same clean rows)."""
        clean = target if isinstance(target, CleanRows) else CleanRows.of(target, keep)
        x, y = clean.x, _rows(recon, keep)
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b, m2_b = clean.mean, clean.m2
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
        norm_in, norm_out = clean.norm, y.norm(dim=-1)
        self.norm_in_sum += float(norm_in.sum())
        self.norm_out_sum += float(norm_out.sum())
        # SAELens: a near-zero input norm divides by 1 instead
        self.ratio_sum += float((norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum())
        self.rrb.append(float((norm_out**2).mean() / (x * y).sum(-1).mean()))

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.sse / self.m2 if self.m2 > 0 else float("nan")

    @property
    def mse(self) -> float:
        """Per element (spd-host's convention)."""
        return self.sse / (self.n * self.d) if self.n else float("nan")

    @property
    def mse_per_token(self) -> float:
        """``||x - x_hat||^2`` summed over dimensions, mean over tokens (SAELens)."""
        return self.sse / self.n if self.n else float("nan")

    @property
    def cosine_similarity(self) -> float:
        return self.cos_sum / self.n if self.n else float("nan")

    @property
    def l2_norm_in(self) -> float:
        return self.norm_in_sum / self.n if self.n else float("nan")

    @property
    def l2_norm_out(self) -> float:
        return self.norm_out_sum / self.n if self.n else float("nan")

    @property
    def l2_ratio(self) -> float:
        return self.ratio_sum / self.n if self.n else float("nan")

    @property
    def relative_reconstruction_bias(self) -> float:
        return sum(self.rrb) / len(self.rrb) if self.rrb else float("nan")


@dataclass
class SparsityAccumulator:
    """L0 (mean number of firing components per token), L1, and how often each component fired.

    ``l0_batch_mean`` is Goodfire's aggregation (the unweighted mean of per-batch L0s).
    """

    n_components: int
    n_tokens: int = 0
    firing_total: int = 0
    l1_total: float = 0.0
    batch_l0: list[float] = field(default_factory=list)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.n_components, dtype=torch.int64)

    def add(
        self,
        firings: torch.Tensor,
        activations: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> None:
        f = firings.reshape(-1, firings.shape[-1]).cpu()
        k = None if keep is None else keep.reshape(-1).cpu()
        if k is not None:
            f = f[k]
        if f.shape[0] == 0:
            return
        self.n_tokens += f.shape[0]
        per_token = f.sum(-1)
        self.firing_total += int(per_token.sum())
        self.batch_l0.append(float(per_token.double().mean()))
        self.counts += f.sum(0).to(torch.int64)
        if activations is not None:
            a = activations.reshape(-1, activations.shape[-1]).to("cpu", torch.float64)
            if k is not None:
                a = a[k]
            self.l1_total += float(a.abs().sum())

    @property
    def fired(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def l0(self) -> float:
        return self.firing_total / self.n_tokens if self.n_tokens else float("nan")

    @property
    def l0_batch_mean(self) -> float:
        return sum(self.batch_l0) / len(self.batch_l0) if self.batch_l0 else float("nan")

    @property
    def l1(self) -> float:
        return self.l1_total / self.n_tokens if self.n_tokens else float("nan")

    def density(self) -> torch.Tensor:
        """Fraction of (kept) tokens on which each component fired (SAELens feature_density)."""
        return self.counts.double() / max(self.n_tokens, 1)


DENSITY_BIN_EDGES = [-10.0 + 0.5 * i for i in range(21)]  # log10 density, -10 .. 0


def density_histogram(density: torch.Tensor) -> list[int]:
    """Counts of ``log10(density + 1e-10)`` in ``DENSITY_BIN_EDGES`` bins (last bin closed),
    the quantity SAELens logs as its feature-density histogram."""
    logd = torch.log10(density.double() + 1e-10)
    edges = torch.tensor(DENSITY_BIN_EDGES, dtype=torch.float64)
    idx = torch.bucketize(logd, edges, right=True) - 1
    idx = idx.clamp(0, len(DENSITY_BIN_EDGES) - 2)
    return torch.bincount(idx, minlength=len(DENSITY_BIN_EDGES) - 1).tolist()


def recovered_score(ablated: float, spliced: float, clean: float) -> float | None:
    """``(ablated - spliced) / (ablated - clean)``: 1 = as good as clean, 0 = as bad as ablation.

    ``None`` when ablation does not change the quantity (the score is undefined).
    """
    denom = ablated - clean
    if denom == 0 or denom != denom:
        return None
    return (ablated - spliced) / denom

"""Brute-force reference statistics, computed directly from the toy HarvestBatches.

Written from the definitions in docs/harvest.md with plain loops and dense tensors, independently
of the harvest code (no shared helpers).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from spd_host.adapter import HarvestBatch
from tests.harvest import toy_plugin


@dataclass
class Reference:
    tokens: torch.Tensor  # [N]
    fired: torch.Tensor  # [N, C] bool (all sites, global order)
    acts: dict[str, torch.Tensor]  # type -> [N, C]
    probs: torch.Tensor  # [N, V] exact next-token probabilities
    batches: list[HarvestBatch] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


def build_reference(
    n_batches: int, batch_size: int, seq_len: int, threshold: float = 0.0
) -> Reference:
    fn = toy_plugin.toy_harvest_fn(threshold)
    toks, fired, probs = [], [], []
    acts: dict[str, list[torch.Tensor]] = {t: [] for t in toy_plugin.ACT_TYPES}
    batches = []
    for g in range(n_batches):
        b = fn(toy_plugin.toy_batch(g, batch_size, seq_len))
        batches.append(b)
        N = batch_size * seq_len
        toks.append(b.tokens.reshape(N))
        fired.append(torch.cat([b.firings[s].reshape(N, -1) for s, _ in toy_plugin.SITES], 1))
        for t in toy_plugin.ACT_TYPES:
            acts[t].append(
                torch.cat([b.activations[s][t].reshape(N, -1) for s, _ in toy_plugin.SITES], 1)
            )
        assert b.next_token_logits is not None
        probs.append(torch.softmax(b.next_token_logits.reshape(N, -1).float(), -1).double())
    return Reference(
        torch.cat(toks),
        torch.cat(fired),
        {t: torch.cat(v) for t, v in acts.items()},
        torch.cat(probs),
        batches,
    )


def input_pair_counts(ref: Reference) -> Counter[tuple[int, int]]:
    out: Counter[tuple[int, int]] = Counter()
    for n, c in ref.fired.nonzero().tolist():
        out[(c, int(ref.tokens[n]))] += 1
    return out


def keys() -> list[str]:
    return [f"{s}:{i}" for s, c in toy_plugin.SITES for i in range(c)]

"""Pre-tokenised benchmark batches: Zipf-distributed token ids, a pure function of the batch index.

Only torch is imported, so the delphi child (its own venv, no spd-host) draws exactly the same
batches as the spd-host children. Real text is Zipfian (a few tokens are most of the stream);
uniform ids would spread the (component, token) tables over the whole vocabulary, which no
real corpus does.
"""

from __future__ import annotations

import torch

ZIPF_EXPONENT = 1.1


def zipf_probs(vocab: int, seed: int = 1234) -> torch.Tensor:
    """Token probabilities ``∝ rank^-1.1``, the ranks assigned to ids by a fixed permutation."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    p = ranks**-ZIPF_EXPONENT
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(vocab, dtype=torch.float64)
    out[perm] = p / p.sum()
    return out


def make_batches(vocab: int, batch_size: int, seq_len: int, n_batches: int) -> list[torch.Tensor]:
    """``n_batches`` int64 ``[batch_size, seq_len]`` tensors; batch ``g`` is seeded by ``g``."""
    p = zipf_probs(vocab)
    out = []
    for g in range(n_batches):
        gen = torch.Generator().manual_seed(1_000_003 * (g + 1))
        ids = torch.multinomial(p, batch_size * seq_len, replacement=True, generator=gen)
        out.append(ids.view(batch_size, seq_len))
    return out

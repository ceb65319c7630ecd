"""Window extraction against per-slot brute force, for contiguous and strided inputs."""

from __future__ import annotations

import pytest
import torch

from spd_host.harvest.entries import SiteEntries
from spd_host.harvest.windows import PAD, extract_windows


@pytest.mark.parametrize("strided", [False, True])
def test_windows_match_brute_force(strided: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    B, S, C, W = 3, 7, 5, 2
    tokens = torch.randint(0, 50, (B, S), generator=gen)
    acts = torch.randn(B, S, C, generator=gen)
    if strided:  # same values, non-contiguous memory
        acts = acts.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        assert not acts.is_contiguous()
    fired = acts > 0
    b, s, c = fired.nonzero().unbind(1)
    w = extract_windows(tokens, SiteEntries.from_dense(fired, {"x": acts}, ["x"]), b, s, c, W)
    for e in range(b.shape[0]):
        for k, p in enumerate(range(int(s[e]) - W, int(s[e]) + W + 1)):
            inside = 0 <= p < S
            assert int(w.tokens[e, k]) == (int(tokens[b[e], p]) if inside else PAD)
            assert bool(w.fired[e, k]) == (inside and bool(fired[b[e], p, c[e]]))
            assert float(w.acts[e, k, 0]) == (float(acts[b[e], p, c[e]]) if inside else 0.0)


def test_sparse_site_windows_match_brute_force() -> None:
    """A sparse site (entries only; zero elsewhere) looked up by neighbours in component order."""
    gen = torch.Generator().manual_seed(2)
    B, S, C, W = 4, 9, 3, 3
    tokens = torch.randint(0, 50, (B, S), generator=gen)
    fired = torch.rand(B, S, C, generator=gen) < 0.45
    acts = torch.where(fired, torch.rand(B, S, C, generator=gen) + 0.1, torch.zeros(B, S, C))
    dense = SiteEntries.from_dense(fired, {"x": acts}, ["x"])
    sparse = SiteEntries(dense.n, dense.c, dense.values, C, keys=dense.n * C + dense.c, n_pos=B * S)
    b, s, c = fired.nonzero().unbind(1)
    w = extract_windows(tokens, sparse, b, s, c, W)
    for e in range(b.shape[0]):
        for k, p in enumerate(range(int(s[e]) - W, int(s[e]) + W + 1)):
            inside = 0 <= p < S
            assert bool(w.fired[e, k]) == (inside and bool(fired[b[e], p, c[e]]))
            assert float(w.acts[e, k, 0]) == (float(acts[b[e], p, c[e]]) if inside else 0.0)

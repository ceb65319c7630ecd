"""Context windows around firing tokens.

A window is stored centred and padded: ``2W + 1`` slots where slot ``W`` is the firing token and
slots outside the sequence hold token id ``-1`` (``PAD``). When read back the padding is
stripped, and the centre index becomes ``W - (number of padded slots on the left)``, so a
window truncated at a sequence edge still says exactly which token fired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

PAD = -1


@dataclass
class Windows:
    """``n`` windows: token ids, activations of the component (one per type), its firings."""

    tokens: torch.Tensor  # [n, 2W+1] int32, PAD outside the sequence
    acts: torch.Tensor  # [n, 2W+1, T] float32, 0 outside
    fired: torch.Tensor  # [n, 2W+1] bool


def extract_windows(
    tokens: torch.Tensor,
    fired: torch.Tensor,
    acts: Mapping[str, torch.Tensor],
    act_types: Sequence[str],
    b: torch.Tensor,
    s: torch.Tensor,
    c: torch.Tensor,
    context: int,
) -> Windows:
    """Windows for events ``(b, s, c)`` of one site (``c`` local to the site)."""
    n = b.shape[0]
    S = tokens.shape[1]
    offs = torch.arange(-context, context + 1)
    pos = s[:, None] + offs[None, :]
    valid = (pos >= 0) & (pos < S)
    posc = pos.clamp(0, S - 1)
    # one flat index per window slot: index_select on a flat view is several times faster
    # than three-tensor advanced indexing
    row = (b[:, None] * S + posc).reshape(-1)
    tok = _take(tokens, row, None).view(n, -1).to(torch.int32)
    tok = torch.where(valid, tok, torch.full_like(tok, PAD))
    flat = (row.view(n, -1) * fired.shape[-1] + c[:, None]).reshape(-1)
    f = _take(fired, flat, (b, posc, c)).view(n, -1) & valid
    a = torch.empty((n, offs.shape[0], len(act_types)), dtype=torch.float32)
    for i, t in enumerate(act_types):
        v = _take(acts[t], flat, (b, posc, c)).view(n, -1).to(torch.float32)
        a[:, :, i] = torch.where(valid, v, torch.zeros_like(v))
    return Windows(tok, a, f)


def _take(
    x: torch.Tensor,
    flat: torch.Tensor,
    bsc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """``x.flatten()[flat]`` without copying ``x`` (advanced indexing if ``x`` is strided)."""
    if x.is_contiguous():
        return x.reshape(-1).index_select(0, flat)
    if bsc is None:
        return x.contiguous().reshape(-1).index_select(0, flat)
    b, posc, c = bsc
    return x[b[:, None].expand_as(posc), posc, c[:, None].expand_as(posc)].reshape(-1)


def strip_padding(tokens: list[int], context: int) -> tuple[int, int]:
    """``(start, end)`` of the non-padded part of a stored window; centre = context - start."""
    start = 0
    while start < context and tokens[start] == PAD:
        start += 1
    end = len(tokens)
    while end > context + 1 and tokens[end - 1] == PAD:
        end -= 1
    return start, end

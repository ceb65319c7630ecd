"""Context windows around firing tokens.

A window is stored centred and padded: ``2W + 1`` slots where slot ``W`` is the firing token and
slots outside the sequence hold token id ``-1`` (``PAD``). When read back the padding is
stripped, and the centre index becomes ``W - (number of padded slots on the left)``, so a
window truncated at a sequence edge still says exactly which token fired. Windows are gathered
on the harvest device, from the dense tensors or the sparse entries of the site
(``SiteEntries.lookup``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd_host.harvest.entries import SiteEntries

PAD = -1


@dataclass
class Windows:
    """``n`` windows: token ids, activations of the component (one per type), its firings."""

    tokens: torch.Tensor  # [n, 2W+1] int32, PAD outside the sequence
    acts: torch.Tensor  # [n, 2W+1, T] float32, 0 outside
    fired: torch.Tensor  # [n, 2W+1] bool


def extract_windows(
    tokens: torch.Tensor,
    site: SiteEntries,
    b: torch.Tensor,
    s: torch.Tensor,
    c: torch.Tensor,
    context: int,
) -> Windows:
    """Windows for events ``(b, s, c)`` of one site (``c`` local to the site)."""
    S = tokens.shape[1]
    offs = torch.arange(-context, context + 1, device=tokens.device)
    pos = s[:, None] + offs[None, :]
    valid = (pos >= 0) & (pos < S)
    posc = pos.clamp(0, S - 1)
    row = b[:, None] * S + posc
    tok = tokens.reshape(-1).index_select(0, row.reshape(-1)).view(row.shape).to(torch.int32)
    tok = torch.where(valid, tok, torch.full_like(tok, PAD))
    fired, acts = site.lookup(row, c)
    fired = fired & valid
    acts = torch.where(valid[:, :, None], acts, torch.zeros_like(acts))
    return Windows(tok, acts, fired)


def strip_padding(tokens: list[int], context: int) -> tuple[int, int]:
    """``(start, end)`` of the non-padded part of a stored window; centre = context - start."""
    start = 0
    while start < context and tokens[start] == PAD:
        start += 1
    end = len(tokens)
    while end > context + 1 and tokens[end - 1] == PAD:
        end -= 1
    return start, end

"""Encoders straight to the sparse HarvestBatch form, in bounded blocks of positions.

The dense route builds ``[N, C]`` pre-activations, activations and a firing mask for every site
of a batch, then ``nonzero``-s them (``spd_host.adapter.sparse_activity_of``). At 32k latents
and 8k positions each of those is a GB, and the harvest needs only the firings. Here each site
is encoded a block of positions at a time (the pre-activation block stays a few MB), and each
block goes to entries at once:

- ReLU / JumpReLU: the block's activations exactly as ``apply_activation`` computes them, then
  the firings (``> threshold``) by one ``nonzero`` of the block;
- TopK: only the ``k`` kept values per position (no dense scatter); their indices are sorted
  per position so the entries come out in ``(position, component)`` order, as ``nonzero``
  gives them.

The result is the same ``SparseActivity`` the dense route makes (same entries, values and
order) because (1) the activation is an elementwise or per-position function of the
pre-activations, and (2) on the CPU a row block of ``x @ W.T`` is bit-identical to the same
rows of the whole product when the blocks hold at least 64 rows and a multiple of 64 (the
remainder joins the last block); MKL takes a different kernel only for very short products
(< 8 rows), measured on this machine. ``BlockedEncode`` checks (2) once per site on the first
batch against the whole product and encodes that site unblocked from then on if it differs.

When a block breaks the sparse contract (an activation non-zero where the site does not fire,
e.g. a negative JumpReLU threshold, or NaN), the caller gets ``None`` and uses the dense route,
exactly as ``sparse_activity_of`` would have sent it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spd_adapters._dictionary import Activation, apply_activation
from spd_host.adapter import SparseActivity

BLOCK_ELEMENTS = 1 << 21
"""Pre-activation elements per block (8 MB in float32): big enough for an efficient product,
small enough to stay near the cache and bound a batch's transient memory."""
DEVICE_BLOCK_ELEMENTS = 1 << 25
"""On an accelerator (128 MB in float32): fewer, larger blocks, as each block's checks read
one flag back to the host."""
ROW_QUANTUM = 64
CHECK_BLOCKS = 4  # the once-per-site check compares this many blocks with one product  # blocks are multiples of this many rows (see the module docstring)
SPARSE_KINDS = ("relu", "jumprelu", "topk")


@dataclass(frozen=True)
class SiteEncoder:
    """One site's encoder as the harvest uses it: the captured input and its two steps.

    ``pre`` maps inputs ``[..., d_in]`` to pre-activations ``[..., C]`` (the same function the
    adapter's ``encode`` uses), ``activation`` turns those into activations; the dense encode
    is ``apply_activation(pre(x), activation)``.
    """

    x: Tensor
    pre: Callable[[Tensor], Tensor]
    activation: Activation
    n_features: int

    def dense(self) -> Tensor:
        return apply_activation(self.pre(self.x), self.activation)


def block_elements(device: torch.device, cpu: int | None = None) -> int:
    """Elements per block on ``device``: ``cpu`` (default ``BLOCK_ELEMENTS``) on the CPU,
    ``DEVICE_BLOCK_ELEMENTS`` elsewhere."""
    if device.type == "cpu":
        return BLOCK_ELEMENTS if cpu is None else cpu
    return DEVICE_BLOCK_ELEMENTS


def row_blocks(n_rows: int, n_cols: int, elements: int = BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    """``[(start, stop)]`` covering ``n_rows``: multiples of ``ROW_QUANTUM`` rows of about
    ``elements // n_cols`` rows each, the remainder merged into the last block."""
    rows = max(ROW_QUANTUM, (elements // max(n_cols, 1)) // ROW_QUANTUM * ROW_QUANTUM)
    if n_rows <= rows:
        return [(0, n_rows)]
    starts = list(range(0, n_rows - rows + 1, rows))
    stops = [*starts[1:], n_rows]
    return list(zip(starts, stops, strict=True))


def sparse_encode(
    enc: SiteEncoder,
    threshold: float,
    *,
    blocks: list[tuple[int, int]] | None = None,
) -> SparseActivity | None:
    """The site's firings (activation ``> threshold``) as a ``SparseActivity`` of
    ``{"activation": values}``, or None when the sparse contract does not hold (or the
    activation has no sparse route here: BatchTopK, GroupMax, a negative threshold)."""
    act = enc.activation
    if act.kind not in SPARSE_KINDS or threshold < 0:
        return None
    d = int(enc.x.shape[-1])
    x = enc.x.reshape(-1, d)
    N = int(x.shape[0])
    poss, comps, vals = [], [], []
    for a, b in blocks if blocks is not None else [(0, N)]:
        pre = enc.pre(x[a:b])
        got = (
            _topk_block(pre, act, threshold)
            if act.kind == "topk"
            else _jump_block(pre, act, threshold)
        )
        if got is None:
            return None
        p, c, v = got
        poss.append(p + a)
        comps.append(c)
        vals.append(v)
    if not poss:
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        return SparseActivity(empty, empty, {"activation": torch.zeros(0, device=x.device)})
    return SparseActivity(torch.cat(poss), torch.cat(comps), {"activation": torch.cat(vals)})


def _jump_block(
    pre: Tensor, act: Activation, threshold: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """ReLU / JumpReLU in one comparison where that is provably the dense route's answer.

    With ``t' = max(t, threshold)`` per feature (``t`` the JumpReLU threshold, 0 for ReLU) a
    float32 block fires exactly where ``pre > t'``, with activation ``pre`` itself (``pre *
    1.0`` and ``relu(pre)`` of a positive ``pre`` are ``pre``), and is zero elsewhere, provided
    (a) no activation can lie in ``(0, threshold]`` without firing: ``t >= threshold`` per
    feature (``max(t, 0)`` when rectified), and (b) the block is finite (NaN / -inf would
    become non-zero activations off the firings): one ``sum``. Otherwise the general block.
    """
    if pre.dtype != torch.float32 or pre.ndim != 2 or not pre.is_contiguous():
        return _dense_block(pre, act, threshold)
    if act.kind == "relu":
        if threshold != 0:
            return _dense_block(pre, act, threshold)
        cut: Tensor | float = 0.0
    else:
        assert act.threshold is not None
        t = act.threshold.to(device=pre.device, dtype=pre.dtype)
        floor = t.clamp_min(0) if act.rectify else t
        if not bool((floor >= threshold).all()):
            return _dense_block(pre, act, threshold)
        cut = t.clamp_min(threshold)
    if not bool(torch.isfinite(pre.sum())):
        return _dense_block(pre, act, threshold)
    C = int(pre.shape[1])
    idx = (pre > cut).view(-1).nonzero().squeeze(1)
    p = torch.div(idx, C, rounding_mode="floor")
    return p, idx - p * C, pre.view(-1).index_select(0, idx)


def _dense_block(
    pre: Tensor, act: Activation, threshold: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """ReLU / JumpReLU: the block's activations as the dense route computes them, then one
    ``nonzero`` of the firings; None if a non-zero activation does not fire (one count)."""
    v = apply_activation(pre, act).float()
    fired = v > threshold
    p, c = fired.nonzero().unbind(1)
    if int(torch.count_nonzero(v)) != int(p.shape[0]):  # threshold >= 0: every firing is non-zero
        return None
    return p, c, v[p, c]


def _topk_block(
    pre: Tensor, act: Activation, threshold: float
) -> tuple[Tensor, Tensor, Tensor] | None:
    """TopK: the ``k`` kept values per position (``topk`` as ``apply_activation`` takes it),
    indices sorted per position; None if a kept value is non-zero but does not fire."""
    assert act.k is not None
    values, indices = pre.topk(act.k, dim=-1, sorted=False)
    if act.rectify:
        values = values.clamp_min(0)
    values = values.float()
    fired = values > threshold
    # values that are neither firing nor zero break the contract (includes NaN)
    if bool((fired != (values != 0)).any()):
        return None
    indices, order = indices.sort(dim=-1)
    values = values.gather(-1, order)
    fired = fired.gather(-1, order)
    rows = torch.arange(pre.shape[0], device=pre.device)[:, None].expand_as(indices)
    return rows[fired], indices[fired], values[fired]


class BlockedEncode:
    """Per-site memory of whether blocked products match the whole one (checked once).

    ``encode(name, enc, threshold)`` returns the site's ``SparseActivity`` or None (use the
    dense route). The first call per site also encodes the first ``CHECK_BLOCKS`` blocks of
    positions both blocked and as one product (bounding that transient too) and compares; on
    any difference the site is encoded in one block from then on (still sparse, still the
    same maths, only without the memory bound).
    """

    def __init__(self, elements: int | None = None) -> None:
        self.elements = elements
        self.blocked_ok: dict[str, bool] = {}

    def encode(self, name: str, enc: SiteEncoder, threshold: float) -> SparseActivity | None:
        if enc.activation.kind not in SPARSE_KINDS or threshold < 0:
            return None
        N = enc.x.numel() // max(int(enc.x.shape[-1]), 1)
        elements = self.elements or block_elements(enc.x.device)
        blocks = row_blocks(N, enc.n_features, elements)
        if len(blocks) == 1:
            return sparse_encode(enc, threshold, blocks=blocks)
        ok = self.blocked_ok.get(name)
        if ok is None:
            ok = self._check(enc, threshold, blocks[0][1] * CHECK_BLOCKS, elements)
            self.blocked_ok[name] = ok
        return sparse_encode(enc, threshold, blocks=blocks if ok else [(0, N)])

    @staticmethod
    def _check(enc: SiteEncoder, threshold: float, rows: int, elements: int) -> bool:
        """Blocked vs one product on the first ``rows`` positions (a bounded transient)."""
        d = int(enc.x.shape[-1])
        head = SiteEncoder(enc.x.reshape(-1, d)[:rows], enc.pre, enc.activation, enc.n_features)
        m = int(head.x.shape[0])
        got = sparse_encode(head, threshold, blocks=row_blocks(m, enc.n_features, elements))
        return _same(got, sparse_encode(head, threshold, blocks=[(0, m)]))


def _same(a: SparseActivity | None, b: SparseActivity | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        torch.equal(a.position, b.position)
        and torch.equal(a.component, b.component)
        and all(torch.equal(a.values[t], b.values[t]) for t in a.values)
    )

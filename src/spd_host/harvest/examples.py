"""Per-component example banks: a uniform reservoir sample and the top-K by activation.

Rows are allocated lazily, the first time a component fires, so memory grows with the number
of components that fire (alive components), not with the total number of components.

Reservoir (Algorithm R, vectorised per batch): the ``t``-th firing of a component (1-based,
counted over the whole run in data order) is kept with probability ``min(1, K/t)`` and replaces
a uniformly chosen slot. Applying every event of a batch at once is equivalent to applying
them one by one because the draws are independent: for each slot the *last* accepted event wins.
The result is a uniform sample without replacement of size ``min(K, n)`` from all ``n``
firings. Randomness comes from a generator seeded by ``(seed, global batch index)``, so a
resumed or re-run harvest draws exactly the same numbers.

Top-K: the K firings with the largest primary activation (ties: earlier position first).
"""

from __future__ import annotations

import torch

from spd_host.harvest.windows import Windows


class ExampleBank:
    """K example windows per component, stored in lazily allocated rows.

    Why rows are reserved rather than regrown on the CPU: a row is assigned the first time its
    component fires, and growing the arrays by copying (the old and the new buffers alive at
    once, the new one initialised in full) made the peak about three times what the alive
    rows need. On the CPU the arrays are reserved for every component with ``torch.empty``
    (address space only: the operating system commits a page when it is first written) and a
    row is initialised when it is assigned, so resident memory is what the alive rows use and
    nothing is ever copied. On other devices (where memory is committed at allocation) the
    arrays grow geometrically, again initialising only assigned rows.
    """

    def __init__(
        self,
        n_components: int,
        k: int,
        width: int,
        n_types: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_components = n_components
        self.k = k
        self.width = width
        self.n_types = n_types
        self.device = torch.device(device)
        self.row_of = torch.full((n_components,), -1, dtype=torch.int64, device=self.device)
        self.component = torch.empty(0, dtype=torch.int64, device=self.device)
        self._alloc(self._reserve())

    def _reserve(self) -> int:
        return self.n_components if self.device.type == "cpu" else 0

    def _alloc(self, cap: int) -> None:
        """Uninitialised arrays of ``cap`` rows (rows are initialised by ``_init_rows``)."""
        k, w, t, dev = self.k, self.width, self.n_types, self.device
        self.filled = torch.empty(cap, dtype=torch.int64, device=dev)
        self.score = torch.empty((cap, k), dtype=torch.float32, device=dev)
        self.pos = torch.empty((cap, k), dtype=torch.int64, device=dev)
        self.tokens = torch.empty((cap, k, w), dtype=torch.int32, device=dev)
        self.acts = torch.empty((cap, k, w, t), dtype=torch.float32, device=dev)
        self.fired = torch.empty((cap, k, w), dtype=torch.bool, device=dev)

    def _init_rows(self, start: int, end: int) -> None:
        self.filled[start:end] = 0
        self.score[start:end] = float("-inf")
        self.pos[start:end] = -1
        self.tokens[start:end] = -1
        self.acts[start:end] = 0
        self.fired[start:end] = False

    FIELDS = ("filled", "score", "pos", "tokens", "acts", "fired")

    @property
    def n_rows(self) -> int:
        return int(self.component.shape[0])

    def rows_for(self, comps: torch.Tensor) -> torch.Tensor:
        """Rows of ``comps`` (unique int64), allocating rows for components seen first now."""
        rows = self.row_of[comps]
        new = comps[rows < 0]
        if new.numel():
            start = self.n_rows
            need = start + new.numel()
            cap = self.filled.shape[0]
            if need > cap:
                self._grow(min(self.n_components, max(need, cap * 2 + 64)))
            self._init_rows(start, need)
            self.row_of[new] = torch.arange(start, need, device=self.device)
            self.component = torch.cat([self.component, new])
            rows = self.row_of[comps]
        return rows

    def _grow(self, cap: int) -> None:
        old = {f: getattr(self, f) for f in self.FIELDS}
        n = self.n_rows
        self._alloc(cap)
        for f, t in old.items():
            getattr(self, f)[:n] = t[:n]

    def write(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
        w: Windows,
    ) -> None:
        self.score[rows, slots] = score.to(torch.float32)
        self.pos[rows, slots] = pos
        self.tokens[rows, slots] = w.tokens
        self.acts[rows, slots] = w.acts
        self.fired[rows, slots] = w.fired

    # -- state ------------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        n = self.n_rows
        out = {f"{prefix}.component": self.component.clone()}
        for f in self.FIELDS:
            out[f"{prefix}.{f}"] = getattr(self, f)[:n].contiguous()
        return out

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        dev = self.device
        comp = tensors[f"{prefix}.component"].to(dev, torch.int64)
        n = int(comp.shape[0])
        self.row_of = torch.full((self.n_components,), -1, dtype=torch.int64, device=dev)
        self.row_of[comp] = torch.arange(n, device=dev)
        self.component = comp.clone()
        self._alloc(max(n, self._reserve()))
        for f in self.FIELDS:
            getattr(self, f)[:n] = tensors[f"{prefix}.{f}"].to(dev)


def reservoir_plan(
    comps: torch.Tensor,
    before: torch.Tensor,
    k: int,
    gen: torch.Generator,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which events enter the reservoir, and in which slot.

    ``comps``: component of each event, events in data order. ``before``: firings of each
    event's component before this batch. Returns ``(event_index, slot)`` of the events that
    end up in the reservoir after the batch (at most one per (component, slot)).
    ``order``: the events' stable sort by component, when the caller has it already.
    """
    n = comps.shape[0]
    dev = comps.device
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return empty, empty
    if order is None:  # group by component, data order within
        order = torch.sort(comps, stable=True).indices
    sc = comps[order]
    starts = torch.ones(n, dtype=torch.bool, device=dev)
    starts[1:] = sc[1:] != sc[:-1]
    ar = torch.arange(n, device=dev)
    group_start = torch.cummax(torch.where(starts, ar, 0), 0).values
    rank = ar - group_start
    t = before[order] + rank + 1  # 1-based index of this firing over the whole run
    # the draws come from the CPU generator (the same numbers on every device)
    u = torch.rand(n, generator=gen, dtype=torch.float64).to(dev)
    r = torch.randint(0, k, (n,), generator=gen).to(dev)
    accept = (t <= k) | (u < k / t.to(torch.float64))
    slot = torch.where(t <= k, t - 1, r)
    ev = order[accept]
    slot = slot[accept]
    tt = t[accept]
    key = sc[accept] * k + slot
    # last accepted event per (component, slot) wins
    uk, inv = torch.unique(key, return_inverse=True)
    best = torch.full((uk.shape[0],), -1, dtype=torch.int64, device=dev)
    best.scatter_reduce_(0, inv, tt, "amax")
    win = tt == best[inv]
    return ev[win], slot[win]


def topk_plan(
    comps: torch.Tensor, values: torch.Tensor, bank: ExampleBank
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge this batch's candidates (events in data order) into the top-K rows.

    Returns ``(rows, slots, src_is_new, src_index)`` for every entry of the new top-K of each
    touched component (``src_index`` is an event index when new, else an old slot) plus the
    new ``filled`` count per touched row is implied by the entries.
    """
    k = bank.k
    row_of_event = bank.row_of[comps]
    if comps.numel() and bool((row_of_event < 0).any()):  # the harvest allocates rows first
        bank.rows_for(torch.unique(comps))
        row_of_event = bank.row_of[comps]
    # keep only events that can enter: better than the current K-th (or row not full)
    kth = torch.where(
        bank.filled[row_of_event] >= k,
        bank.score[row_of_event, k - 1],
        torch.full_like(values, float("-inf")),
    )
    cand = torch.nonzero(values.to(torch.float32) > kth).flatten()
    dev = comps.device
    if cand.numel() == 0:
        e = torch.empty(0, dtype=torch.int64, device=dev)
        return e, e, torch.empty(0, dtype=torch.bool, device=dev), e, torch.empty(0, device=dev)
    c_rows = row_of_event[cand]
    touched = torch.unique(c_rows)
    # existing entries of touched rows
    filled = bank.filled[touched]
    slot_idx = torch.arange(k, device=dev)[None, :].expand(touched.shape[0], k)
    ok = slot_idx < filled[:, None]
    old_rows = touched[:, None].expand_as(slot_idx)[ok]
    old_slots = slot_idx[ok]
    old_score = bank.score[old_rows, old_slots]
    all_rows = torch.cat([old_rows, c_rows])
    all_score = torch.cat([old_score, values[cand].to(torch.float32)])
    is_new = torch.cat(
        [torch.zeros_like(old_rows, dtype=torch.bool), torch.ones_like(cand, dtype=torch.bool)]
    )
    src = torch.cat([old_slots, cand])
    # sort: row ascending, score descending, earlier position first on ties (so a merge of
    # shards ranks ties exactly like a single pass)
    # One stable sort by (row, score descending): the input lists each row's old entries
    # first, already ranked (score descending, earlier position first), then the new events in
    # data order, all later than the old ones, so equal scores stay in position order.
    o = torch.sort(all_rows * (1 << 32) + descending_key(all_score), stable=True).indices
    r_sorted = all_rows[o]
    n = o.shape[0]
    starts = torch.ones(n, dtype=torch.bool, device=dev)
    starts[1:] = r_sorted[1:] != r_sorted[:-1]
    ar = torch.arange(n, device=dev)
    gs = torch.cummax(torch.where(starts, ar, 0), 0).values
    rank = ar - gs
    keep = rank < k
    o = o[keep]
    return all_rows[o], rank[keep], is_new[o], src[o], all_score[o]


def descending_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in ``[0, 2**32)`` that sorts float32 ``x`` descending (``-0.0`` equals ``0.0``)."""
    b = (x.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    ascending = torch.where(b >= 0, b + (1 << 31), -1 - b)
    return (1 << 32) - 1 - ascending

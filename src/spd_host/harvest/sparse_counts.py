"""Sparse accumulation of counts keyed by int64 pairs.

Why: the reference implementation keeps dense ``C x C`` co-occurrence and ``C x vocab`` token
tensors, which cannot exist for a million components. Here only pairs that actually occurred
are stored, as a sorted int64 key array (``row * n_cols + col``) with a value per key, so memory
grows with the number of distinct observed pairs.

Updates are appended to a buffer of raw keys. When the buffer passes ``buffer_limit`` entries
(and at every query), it is sorted and reduced on its own, then merged into the sorted main
table by binary search: existing keys are added to in place, new keys are inserted in one linear
pass. So the table is never re-sorted, and the amortised cost per update is a share of one sort
of the buffer plus a linear share of the table per consolidation. Results do not depend on when
consolidation happens (integer addition), so checkpoints and resumes are bit-identical.

Background merges (``background=True``, CPU only): a full buffer is handed to one shared
merge thread and the next updates fill a fresh buffer meanwhile, so on a machine with a spare
core the sort and merge (measured ~45% of a 1M-component accumulation) leave the update's
critical path. At most one merge per table is in flight (a second full buffer waits for it, so
memory stays bounded by two buffers), and every query (``len``, ``row``, ``state``, ``prune``,
``consolidate``) first waits for it. Only *when* a buffer is folded in moves, never what is
added, so the table is the same bits either way. torch and numpy release the GIL inside their
sorts, searches and scatters, which is what lets the merge run beside the update. Off on
other devices: their ops are already asynchronous to the host.

Integer tables (``dtype=torch.int64``) are exact. Float tables accumulate in float64.
Everything runs on the table's device (sort, search and scatter are device ops), and the
result is the same on any device: integer addition does not depend on order.

``DensePairCounter`` has the same interface over a dense ``n_rows x n_cols`` table, for grids
small enough to hold (a scatter-add per update, no sort); both give the same keys and values.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from spd_host.harvest.sorting import kth_smallest, sort_with_order, sorted_keys


class SparsePairCounter:
    """A map ``(row, col) -> value`` over an ``n_rows x n_cols`` grid, stored sparsely."""

    def __init__(
        self,
        n_rows: int,
        n_cols: int,
        *,
        dtype: torch.dtype = torch.int64,
        device: torch.device | str = "cpu",
        background: bool = False,
    ) -> None:
        if n_rows * n_cols >= 2**62:
            raise ValueError(f"grid {n_rows} x {n_cols} does not fit int64 keys")
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.dtype = dtype
        self.device = torch.device(device)
        self.keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self.values = torch.empty(0, dtype=dtype, device=self.device)
        self._buf_keys: list[torch.Tensor] = []
        self._buf_values: list[torch.Tensor | None] = []  # None: a weight of 1 per key
        self._buf_len = 0
        self._values_shared = False  # self.values is also held outside: copy before adding
        # reserved (keys, values) storage that self.keys / self.values are views of, when the
        # table owns storage with slack for in-place merges (None: no slack)
        self._store: tuple[torch.Tensor, torch.Tensor] | None = None
        self.buffer_limit = 1 << 24
        self.background = background and self.device.type == "cpu"
        self._pending: Future[None] | None = None  # the merge in flight (background only)
        self._pending_len = 0  # raw entries it holds (for upper_len)
        self._pruned_total = 0

    # -- updates ----------------------------------------------------------------------------------
    def add_keys(self, keys: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add ``weights`` (1 each when None) at ``keys`` (int64 ``row * n_cols + col``).

        Keys are buffered raw and reduced in one sort at consolidation time (cheaper than a
        ``torch.unique`` per batch plus a merge).
        """
        if keys.numel() == 0:
            return
        self._buf_keys.append(keys.to(self.device, torch.int64))
        self._buf_values.append(None if weights is None else weights.to(self.device, self.dtype))
        self._buf_len += int(keys.shape[0])
        if self._buf_len > self.buffer_limit:
            if self.background:
                self._fold_in_background()
            else:
                self.consolidate()

    def add(
        self, rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        self.add_keys(rows.to(torch.int64) * self.n_cols + cols.to(torch.int64), weights)

    def consolidate(self) -> None:
        """Fold the buffer into the sorted main table (sum of values per distinct key)."""
        self._wait()
        if self._buf_keys:
            self._fold(*self._take_buffer())

    def _take_buffer(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        chunks, weights = self._buf_keys, self._buf_values
        self._buf_keys, self._buf_values, self._buf_len = [], [], 0
        return chunks, weights

    def _fold_in_background(self) -> None:
        """Hand the full buffer to the merge thread (after the previous merge is done)."""
        self._submit(self._fold)

    def _submit(self, job: Callable[..., None], *args: int) -> None:
        """Run ``job(chunks, weights, *args)`` on the buffer, on the merge thread, once the
        merge in flight is done (so at most one per table)."""
        self._wait()
        n = self._buf_len
        chunks, weights = self._take_buffer()
        self._pending_len = n
        self._pending = _merge_executor().submit(job, chunks, weights, *args)

    def _wait(self) -> None:
        """Wait for the merge in flight; an error raised in it is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._pending_len = 0
            pending.result()

    @torch.no_grad()
    def _fold(self, chunks: list[torch.Tensor], weights: list[torch.Tensor | None]) -> None:
        """Sum the buffered ``chunks`` per key and merge them into the table.

        The lists are emptied as they are used (they may also be held by the merge thread's
        work item), so the peak holds the buffer about twice, not four times."""
        unit = all(v is None for v in weights)
        vals = (
            None
            if unit
            else torch.cat(
                [
                    torch.ones_like(k, dtype=self.dtype) if v is None else v
                    for k, v in zip(chunks, weights, strict=True)
                ]
            )
        )
        weights.clear()
        keys = torch.cat(chunks)
        chunks.clear()
        if vals is None:
            # unit weights: the count per key is a run length of the sorted keys
            keys = sorted_keys(keys)
            bk, bv = torch.unique_consecutive(keys, return_counts=True)
            del keys
            bv = bv.to(self.dtype)
        else:
            held = [keys, vals]
            del keys, vals
            bk, bv = _sum_by_key(held)
        self._merge_in([bk, bv])

    def _merge_in(self, held: list[torch.Tensor]) -> None:
        """Merge distinct sorted keys ``bk`` (values ``bv``), ``held = [bk, bv]``, into the
        table (linear, no sort). The list is emptied, so the buffer's arrays are freed as soon
        as the new keys are taken out of them.

        Existing keys are added to in place. New keys are inserted without boolean-mask
        scatters over the table: old entry ``i`` moves to ``i + #{new keys before it}``,
        computed per chunk of the table from the new keys' insertion points (``_place_old``),
        and the new keys fill the gaps. The table lives in storage reserved with slack
        (``_reserve``): while it fits, the merge runs in place (old entries shifted right,
        chunk by chunk from the end, so the transient is one chunk plus the buffer's arrays,
        not a second table); otherwise, or when the arrays were handed out (``state()``) or
        taken from outside (``load_state``), the merged table is written into fresh storage.
        """
        bk, bv = held.pop(0), held.pop(0)
        if self.keys.numel() == 0:
            # the first keys go straight into reserved storage, so the next merge runs in
            # place too (else it would hold this table twice)
            n = int(bk.shape[0])
            sk, sv = self._reserve(n)
            sk[:n] = bk
            sv[:n] = bv
            del bk, bv
            self._store = (sk, sv)
            self.keys, self.values, self._values_shared = sk[:n], sv[:n], False
            return
        if bk.numel() == 0:
            return
        ak = self.keys
        n_old = int(ak.shape[0])
        idx = torch.searchsorted(ak, bk)
        found = ak.index_select(0, idx.clamp(max=n_old - 1)) == bk
        if bool(found.any()):
            if self._values_shared:  # handed out by state() / taken from load_state()
                self.values = self.values.clone()
                self._values_shared = False
                self._store = None
            self.values.index_add_(0, idx[found], bv[found])
            if bool(found.all()):
                return
        new = (~found).nonzero().flatten()
        del found
        nk, nv, nidx = bk.index_select(0, new), bv.index_select(0, new), idx.index_select(0, new)
        del bk, bv, idx, new
        n_new = int(nk.shape[0])
        n = n_old + n_new
        in_place = (
            self._store is not None and not self._values_shared and self._store[0].shape[0] >= n
        )
        if in_place:
            assert self._store is not None
            sk, sv = self._store
        else:
            sk, sv = self._reserve(n)
        _place_old(ak, self.values, nidx, sk, sv, in_place)
        # new key j goes before old position nidx[j]; its final slot is nidx[j] + j
        new_pos = nidx + torch.arange(n_new, device=nidx.device)
        del nidx
        sk.index_copy_(0, new_pos, nk)
        sv.index_copy_(0, new_pos, nv)
        self._store = (sk, sv)
        self.keys, self.values, self._values_shared = sk[:n], sv[:n], False

    def _reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised key and value storage for at least ``n`` entries, with slack.

        On the CPU the slack costs address space only (pages are committed when first
        written), so it is generous: room for the table to double or take two full buffers.
        On other devices memory is committed at allocation: a quarter more.
        """
        slack = max(n, 2 * self.buffer_limit) if self.device.type == "cpu" else max(n // 4, 1)
        cap = min(n + slack, self.n_rows * self.n_cols)
        return (
            torch.empty(cap, dtype=torch.int64, device=self.device),
            torch.empty(cap, dtype=self.dtype, device=self.device),
        )

    def merge_(self, other: SparsePairCounter | DensePairCounter) -> None:
        """Add another counter's entries (used to combine shards; exact for int64)."""
        if (other.n_rows, other.n_cols) != (self.n_rows, self.n_cols):
            raise ValueError("cannot merge counters over different grids")
        other.consolidate()
        self._buf_keys.append(other.keys.to(self.device))
        self._buf_values.append(other.values.to(self.device, self.dtype))
        self.consolidate()

    def prune(self, keep: int) -> int:
        """Drop the smallest entries so that at most ``keep`` remain; return the threshold.

        Every entry with a value ``<= tau`` goes (``tau``: the value below which all but
        ``keep`` entries lie), so each surviving or later re-created entry under-estimates its
        exact total by at most the sum of the thresholds of all prunes (lossy counting), and a
        dropped pair's exact total is at most that sum too. ``pruned_total`` sums them.
        """
        self.consolidate()
        return self._prune_table(keep)

    def bound(self, cap: int, keep: int) -> None:
        """``prune(keep)`` if more than ``cap`` distinct pairs are stored once every key added
        so far is in (a background table queues this behind its merge; the decision is the
        same whenever it runs). The thresholds go to ``pruned_total``."""
        if self.upper_len() <= cap:  # an upper bound: nothing to do, and no wait
            return
        if not self.background:
            if len(self) > cap:
                self.prune(keep)
            return
        self._submit(self._fold_and_bound, cap, keep)

    @torch.no_grad()
    def _fold_and_bound(
        self, chunks: list[torch.Tensor], weights: list[torch.Tensor | None], cap: int, keep: int
    ) -> None:
        if chunks:
            self._fold(chunks, weights)
        if int(self.keys.shape[0]) > cap:
            self._prune_table(keep)

    def _prune_table(self, keep: int) -> int:
        n = int(self.keys.shape[0])
        if n <= keep:
            return 0
        tau = kth_smallest(self.values, n - keep)
        mask = self.values > tau
        self.keys, self.values, self._values_shared = self.keys[mask], self.values[mask], False
        self._store = None
        self._pruned_total += tau
        return tau

    def pruned_total(self) -> int:
        """The summed thresholds of this table's prunes since it was made or loaded (waits for
        a prune in flight)."""
        self._wait()
        return self._pruned_total

    # -- queries ----------------------------------------------------------------------------------
    def upper_len(self) -> int:
        """An upper bound on ``len`` that does not consolidate (table plus raw buffers; the
        table may already include the merge in flight, which is then counted twice)."""
        return int(self.keys.shape[0]) + self._pending_len + self._buf_len

    def __len__(self) -> int:
        self.consolidate()
        return int(self.keys.shape[0])

    def distinct_len(self) -> int:
        """``len`` without folding the buffer in: the table's keys (once the merge in flight is
        done) plus the buffer's distinct keys that the table lacks.

        Why: a cap checked after every batch (co-occurrence's ``cooccurrence_max_pairs``)
        would otherwise merge the whole table each time it is near the cap, in the update's
        critical path; this costs a sort of the buffer and a binary search per distinct key."""
        self._wait()
        n = int(self.keys.shape[0])
        if not self._buf_keys:
            return n
        bk = torch.unique_consecutive(sorted_keys(torch.cat(self._buf_keys)))
        if n == 0:
            return int(bk.shape[0])
        at = torch.searchsorted(self.keys, bk).clamp_(max=n - 1)
        present = int((self.keys.index_select(0, at) == bk).sum())
        return n + int(bk.shape[0]) - present

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns and values of one row (binary search on the sorted keys)."""
        self.consolidate()
        bounds = torch.tensor([r * self.n_cols, (r + 1) * self.n_cols], device=self.device)
        lo, hi = torch.searchsorted(self.keys, bounds).tolist()
        return self.keys[lo:hi] % self.n_cols, self.values[lo:hi]

    def nbytes(self) -> int:
        """Bytes held (without waiting for a merge in flight: its buffer is counted as raw
        entries, an upper bound while it is being merged)."""
        pending = self._pending_len * (8 + self.values.element_size())
        return (
            pending
            + self.keys.numel() * 8
            + self.values.numel() * self.values.element_size()
            + sum(
                k.numel() * 8 + (0 if v is None else v.numel() * v.element_size())
                for k, v in zip(self._buf_keys, self._buf_values, strict=True)
            )
        )

    # -- state ------------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        self.consolidate()
        self._values_shared = True
        return {f"{prefix}.keys": self.keys, f"{prefix}.values": self.values}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self._wait()
        self._buf_keys, self._buf_values, self._buf_len = [], [], 0
        self._pruned_total = 0
        self.keys = tensors[f"{prefix}.keys"].to(self.device, torch.int64)
        self.values = tensors[f"{prefix}.values"].to(self.device, self.dtype)
        self._values_shared = True
        self._store = None


class DensePairCounter:
    """``SparsePairCounter``'s interface over a dense table (for grids that fit in memory).

    Updates are one ``index_add_`` (no buffer, no sort); ``keys``/``values`` (the non-zero
    entries, sorted) are derived on demand, so states, merges and results have the same form
    and the same content as the sparse counter's. Rule of use: the harvest picks it when
    ``n_rows * n_cols * 8`` bytes fit its dense budget (``HarvestConfig.dense_table_bytes``).
    """

    def __init__(
        self,
        n_rows: int,
        n_cols: int,
        *,
        dtype: torch.dtype = torch.int64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.dtype = dtype
        self.device = torch.device(device)
        self.table = torch.zeros(n_rows * n_cols, dtype=dtype, device=self.device)

    def add_keys(self, keys: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add ``weights`` (1 each when None) at ``keys``.

        Integer tables use ``scatter_add_`` (measured ~1.6x faster than ``index_add_`` on
        one CPU thread for millions of keys; integer addition, so the same bits in any order).
        """
        if keys.numel() == 0:
            return
        keys = keys.to(self.device, torch.int64)
        if weights is None:
            w = torch.ones(keys.shape[0], dtype=self.dtype, device=self.device)
        else:
            w = weights.to(self.device, self.dtype)
        if self.dtype.is_floating_point:
            self.table.index_add_(0, keys, w)
        else:
            self.table.scatter_add_(0, keys, w)

    def add(
        self, rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        self.add_keys(rows.to(torch.int64) * self.n_cols + cols.to(torch.int64), weights)

    def add_dense_(self, rows: torch.Tensor, block: torch.Tensor) -> None:
        """Add ``block`` ``[len(rows), len(rows)]`` at ``(rows[i], rows[j])`` (co-occurrence)."""
        idx = rows[:, None] * self.n_cols + rows[None, :]
        self.add_keys(idx.reshape(-1), block.reshape(-1))

    def consolidate(self) -> None:
        """Nothing to do: the table is always up to date."""

    @property
    def keys(self) -> torch.Tensor:
        return torch.nonzero(self.table).flatten()

    @property
    def values(self) -> torch.Tensor:
        return self.table[self.keys]

    def merge_(self, other: SparsePairCounter | DensePairCounter) -> None:
        if (other.n_rows, other.n_cols) != (self.n_rows, self.n_cols):
            raise ValueError("cannot merge counters over different grids")
        other.consolidate()
        self.add_keys(other.keys, other.values)

    def upper_len(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return int(torch.count_nonzero(self.table))

    def distinct_len(self) -> int:
        return len(self)

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        seg = self.table[r * self.n_cols : (r + 1) * self.n_cols]
        cols = torch.nonzero(seg).flatten()
        return cols, seg[cols]

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        keys = self.keys
        return {f"{prefix}.keys": keys, f"{prefix}.values": self.table[keys]}

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self.table.zero_()
        self.add_keys(tensors[f"{prefix}.keys"], tensors[f"{prefix}.values"])


PairCounter = SparsePairCounter | DensePairCounter


def pair_counter(
    n_rows: int,
    n_cols: int,
    *,
    dense_bytes: int,
    device: torch.device | str,
    background: bool = False,
) -> PairCounter:
    """Dense when the ``n_rows x n_cols`` int64 table fits ``dense_bytes``, else sparse
    (merging in the background when ``background``, see the module docstring)."""
    if n_rows * n_cols * 8 <= dense_bytes:
        return DensePairCounter(n_rows, n_cols, device=device)
    return SparsePairCounter(n_rows, n_cols, device=device, background=background)


_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _merge_executor() -> ThreadPoolExecutor:
    """The one merge thread every background table shares (merges run one at a time, so at
    most one merge's transient memory exists at once), started on first use."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spd-host-merge")
        return _EXECUTOR


def _forget_executor_in_child() -> None:
    """A forked child has no merge thread: it starts its own on first use."""
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR, _EXECUTOR_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_executor_in_child)


_MERGE_CHUNK = 1 << 20  # table entries moved at once by a merge


def _place_old(
    ak: torch.Tensor,
    av: torch.Tensor,
    nidx: torch.Tensor,
    sk: torch.Tensor,
    sv: torch.Tensor,
    in_place: bool,
) -> None:
    """Write old entries ``ak``/``av`` to their merged slots in ``sk``/``sv``.

    ``nidx`` (sorted): each new key's insertion point in ``ak``. Old entry ``i`` goes to
    ``i + #{j : nidx[j] <= i}``; per chunk ``[a, b)`` that is ``a``'s count of earlier new keys
    plus a cumulative sum of the new keys landing inside the chunk. In place (``sk`` is
    ``ak``'s storage) every entry moves right, so chunks go from the end (their destinations
    lie at or after their sources and before the already-moved entries) and each chunk is
    copied out before it is written; entries before the first insertion point stay put.
    """
    n_old = int(ak.shape[0])
    dev = ak.device
    first = int(nidx[0]) if in_place else 0
    starts = list(range(first, n_old, _MERGE_CHUNK))
    if in_place:
        starts.reverse()
    bounds = torch.tensor(
        [[a, min(a + _MERGE_CHUNK, n_old)] for a in starts], dtype=torch.int64, device=dev
    ).reshape(-1, 2)
    lo_hi = torch.searchsorted(nidx, bounds).tolist()  # new keys with nidx < a, < b
    for a, (lo, hi) in zip(starts, lo_hi, strict=True):
        b = min(a + _MERGE_CHUNK, n_old)
        shift = torch.bincount(nidx[lo:hi] - a, minlength=b - a)
        torch.cumsum(shift, 0, out=shift)
        dest = shift.add_(torch.arange(a + lo, b + lo, device=dev))
        k, v = ak[a:b], av[a:b]
        if in_place:
            k, v = k.clone(), v.clone()
        sk.index_copy_(0, dest, k)
        sv.index_copy_(0, dest, v)


def _sum_by_key(held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys (sorted) and the sum of values per key: one sort plus a segmented sum.

    ``held = [keys, values]`` is emptied, so each input is freed as soon as it is used.
    """
    keys, values = held.pop(0), held.pop(0)
    if keys.numel() == 0:
        return keys, values
    sk, order = sort_with_order(keys)
    del keys
    values = values.index_select(0, order)
    del order
    new = torch.ones(sk.shape[0], dtype=torch.bool, device=sk.device)
    new[1:] = sk[1:] != sk[:-1]
    gid = torch.cumsum(new, 0)
    gid -= 1
    n_out = int(gid[-1]) + 1
    out = torch.zeros(n_out, dtype=values.dtype, device=sk.device)
    out.index_add_(0, gid, values)
    del gid, values
    return sk[new], out

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

Top-K: the K firings with the largest primary activation (ties: earlier position first). A
row's slots hold them in no particular order (``topk_plan``); ``ranked_slots`` ranks them.

Compact layout (what an example costs): a slot holds only its score (float32), a row of a
shared *token pool* (the window's token ids and its global position, kept once for every slot
that refers to that position), the window's ``fired`` flags and *stored* flags as bit masks,
and an offset into a *value heap* holding the window's activations only at stored positions:
those where the component fired or any activation is non-zero (compared bit for bit, so
``-0.0`` is kept). Everything else of the window is ``+0.0``, so the dense window is restored
bit for bit: for a sparse site (zero off its firings by contract) a window costs one value per
firing in it; a dense site (SPD) whose activations are non-zero off the firings stays exact,
at up to ``2W + 1`` values per window. The pool and the heap are appended to; when one is full
it is compacted into a fresh buffer (rows and values that no slot refers to any more are
dropped, then the buffer is sized to twice what is live), so their size is bounded by what the
slots refer to, not by how many examples were ever written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd_host.errors import ConfigError
from spd_host.harvest.runs import rank_in_runs
from spd_host.harvest.windows import Windows

BITS = 31  # flags per int32 word (the sign bit is left alone)
_DECODE_CHUNK = 1 << 18  # slots restored at once by ``field`` (bounds the temporaries)
FIELDS = ("score", "pos", "tokens", "acts", "fired")  # the dense, logical fields of a slot


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """``[..., w]`` bool -> ``[..., ceil(w / 31)]`` int32 (bit ``i % 31`` of word ``i // 31``)."""
    w = flags.shape[-1]
    nw = max(1, -(-w // BITS))
    pad = nw * BITS - w
    f = flags
    if pad:
        f = torch.cat([f, torch.zeros((*f.shape[:-1], pad), dtype=torch.bool, device=f.device)], -1)
    f = f.reshape(*f.shape[:-1], nw, BITS).to(torch.int32)
    weights = torch.ones(BITS, dtype=torch.int32, device=f.device) << torch.arange(
        BITS, dtype=torch.int32, device=f.device
    )
    return (f * weights).sum(-1, dtype=torch.int32)


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Set flags per ``[..., nw]`` int32 mask (31-bit words, so shifts see no sign), int64."""
    x = words - ((words >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = (x + (x >> 16)) & 0x3F
    return x.sum(-1, dtype=torch.int64)


def unpack_bits(words: torch.Tensor, w: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``[..., nw]`` int32 -> ``[..., w]`` bool.

    Flag ``i`` is bit ``i % 31`` of word ``i // 31``: one shift per flag that exists (not 31
    per word; measured 2x faster on 1M 17-flag windows)."""
    i = torch.arange(w, device=words.device)
    shifts = (i % BITS).to(torch.int32)
    per_flag = words if words.shape[-1] == 1 else words.index_select(-1, i // BITS)
    return ((per_flag >> shifts) & 1).to(torch.bool)


def _take(t: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Rows ``at`` of a per-slot array ``[cap, K, ...]`` seen as ``[cap * K, ...]``."""
    return t.view(-1, *t.shape[2:]).index_select(0, at)


def _put(t: torch.Tensor, at: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` at flat slots ``at`` (distinct) of a per-slot array."""
    t.view(-1, *t.shape[2:]).index_copy_(0, at, values.to(t.dtype))


@dataclass
class Packed:
    """The compact form of ``n`` windows (valid until the bank's next ``encode``)."""

    pidx: torch.Tensor  # [n] pool row
    fbits: torch.Tensor  # [n, nw] fired flags
    sbits: torch.Tensor  # [n, nw] stored flags
    hoff: torch.Tensor  # [n] heap offset of the first stored value


class ExampleBank:
    """K example windows per component, stored in lazily allocated rows (compact layout, see
    the module docstring).

    Why rows are reserved rather than regrown on the CPU: a row is assigned the first time its
    component fires, and growing the arrays by copying (the old and the new buffers alive at
    once, the new one initialised in full) made the peak about three times what the alive
    rows need. On the CPU the per-slot arrays are reserved for every component with
    ``torch.empty`` (address space only: the operating system commits a page when it is first
    written) and a row is initialised when it is assigned, so resident memory is what the alive
    rows use and nothing is ever copied. On other devices (where memory is committed at
    allocation) the arrays grow geometrically, again initialising only assigned rows. The pool
    and the heap are small beside the slots and grow by compaction on every device.
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
        self.n_words = max(1, -(-width // BITS))
        # narrowest exact index dtypes: a compacted buffer holds at most twice what the slots
        # can refer to plus one call's appends (every slot once more)
        slots = n_components * k
        self._pool_max = 4 * slots + 16
        self._heap_max = 4 * slots * width * n_types + 16
        self.pidx_dtype = torch.int32 if self._pool_max < 2**31 else torch.int64
        self.hoff_dtype = torch.int32 if self._heap_max < 2**31 else torch.int64
        self.row_of = torch.full((n_components,), -1, dtype=torch.int64, device=self.device)
        self.component = torch.empty(0, dtype=torch.int64, device=self.device)
        self._alloc(self._reserve())
        self._alloc_pool(0)
        self._alloc_heap(0)

    def _reserve(self) -> int:
        return self.n_components if self.device.type == "cpu" else 0

    def _alloc(self, cap: int) -> None:
        """Uninitialised per-slot arrays of ``cap`` rows (initialised by ``_init_rows``)."""
        k, nw, dev = self.k, self.n_words, self.device
        self.filled = torch.empty(cap, dtype=torch.int64, device=dev)
        self.score = torch.empty((cap, k), dtype=torch.float32, device=dev)
        self.pidx = torch.empty((cap, k), dtype=self.pidx_dtype, device=dev)
        self.fbits = torch.empty((cap, k, nw), dtype=torch.int32, device=dev)
        self.sbits = torch.empty((cap, k, nw), dtype=torch.int32, device=dev)
        self.hoff = torch.empty((cap, k), dtype=self.hoff_dtype, device=dev)

    def _alloc_pool(self, cap: int) -> None:
        self.pool_tokens = torch.empty((cap, self.width), dtype=torch.int32, device=self.device)
        self.pool_pos = torch.empty(cap, dtype=torch.int64, device=self.device)
        self.pool_used = 0

    def _alloc_heap(self, cap: int) -> None:
        self.heap = torch.empty(cap, dtype=torch.float32, device=self.device)
        self.heap_used = 0
        self.heap_live = 0  # values some slot refers to (kept up to date by ``set``)

    def _init_rows(self, start: int, end: int) -> None:
        self.filled[start:end] = 0
        self.score[start:end] = float("-inf")
        self.pidx[start:end] = -1  # -1: the slot refers to nothing
        self.fbits[start:end] = 0
        self.sbits[start:end] = 0
        self.hoff[start:end] = -1

    POOL_MIN = 1024  # smallest pool (rows) and heap (values) allocated by a compaction
    HEAP_MIN = 4096
    SLOT_FIELDS = ("filled", "score", "pidx", "fbits", "sbits", "hoff")

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
        old = {f: getattr(self, f) for f in self.SLOT_FIELDS}
        n = self.n_rows
        self._alloc(cap)
        for f, t in old.items():
            getattr(self, f)[:n] = t[:n]

    # -- pool and heap ----------------------------------------------------------------------------
    def _compact_pool(self, need: int) -> None:
        """Keep the pool rows some slot refers to (in pool order), in a buffer with room for
        ``need`` more and as much again."""
        n = self.n_rows
        ref = self.pidx[:n].reshape(-1)
        ref = ref[ref >= 0].to(torch.int64)
        live = torch.zeros(self.pool_used, dtype=torch.bool, device=self.device)
        live[ref] = True
        keep = torch.nonzero(live).flatten()
        new_index = torch.cumsum(live, 0) - 1
        m = int(keep.shape[0])
        old_tok, old_pos = self.pool_tokens, self.pool_pos
        self._alloc_pool(min(self._pool_max, max(2 * (m + need), self.POOL_MIN)))
        self.pool_tokens[:m] = old_tok.index_select(0, keep)
        self.pool_pos[:m] = old_pos.index_select(0, keep)
        self.pool_used = m
        del old_tok, old_pos
        p = self.pidx[:n]
        ok = p >= 0
        p[ok] = new_index[p[ok].to(torch.int64)].to(self.pidx_dtype)

    def _room_in_heap(self, need: int) -> None:
        """Make room for ``need`` more values: grow (a copy, offsets unchanged) when at most a
        quarter of the heap is garbage, else compact."""
        used, live = self.heap_used, self.heap_live
        cap = max(2 * (used + need), self.HEAP_MIN)
        if 4 * (used - live) <= used and cap <= self._heap_max:
            old = self.heap
            self._alloc_heap(cap)
            self.heap[:used] = old[:used]
            self.heap_used, self.heap_live = used, live
            return
        self._compact_heap(need)

    def _compact_heap(self, need: int) -> None:
        """Keep the values some slot refers to (slot by slot, in row order), in a buffer with
        room for ``need`` more and as much again."""
        n, T = self.n_rows, self.n_types
        hoff = self.hoff[:n].reshape(-1)
        sbits = self.sbits[:n].reshape(-1, self.n_words)
        old, live = self.heap, self.heap_live
        self._alloc_heap(min(self._heap_max, max(2 * (live + need), self.HEAP_MIN)))
        used = 0
        for s0 in range(0, hoff.shape[0], _DECODE_CHUNK):
            off = hoff[s0 : s0 + _DECODE_CHUNK].to(torch.int64)
            cnt = popcount(sbits[s0 : s0 + _DECODE_CHUNK]) * T
            cnt = torch.where(off >= 0, cnt, torch.zeros_like(cnt))
            total = int(cnt.sum())
            start = torch.cumsum(cnt, 0) - cnt + used
            if total:
                src = torch.repeat_interleave(off - start, cnt, output_size=total)
                src += torch.arange(used, used + total, device=self.device)
                self.heap[used : used + total] = old.index_select(0, src)
            new_off = torch.where(off >= 0, start, torch.full_like(start, -1))
            hoff[s0 : s0 + _DECODE_CHUNK] = new_off.to(self.hoff_dtype)
            used += total
        self.heap_used = self.heap_live = used

    def _referenced_values(self, hoff: torch.Tensor, sbits: torch.Tensor) -> torch.Tensor:
        """Heap values referred to by slots (``hoff`` ``[n]``, ``sbits`` ``[n, nw]``), int64."""
        cnt = popcount(sbits) * self.n_types
        return torch.where(hoff >= 0, cnt, torch.zeros_like(cnt)).sum()

    def encode(
        self, pos: torch.Tensor, tokens: torch.Tensor, acts: torch.Tensor, fired: torch.Tensor
    ) -> Packed:
        """Append windows to the pool (one row per distinct position of this call) and the heap.

        The returned indices refer to the appended data; write them into slots (``set``)
        before the next ``encode``, which may compact (and so renumber) the pool and the heap.
        """
        n, T = int(pos.shape[0]), self.n_types
        dev = self.device
        upos, inv = torch.unique(pos, return_inverse=True)
        u = int(upos.shape[0])
        first = torch.full((u,), n, dtype=torch.int64, device=dev)
        first.scatter_reduce_(0, inv, torch.arange(n, device=dev), "amin")
        if self.pool_used + u > self.pool_pos.shape[0]:
            self._compact_pool(u)
        base = self.pool_used
        self.pool_tokens[base : base + u] = tokens.index_select(0, first).to(torch.int32)
        self.pool_pos[base : base + u] = upos
        self.pool_used = base + u
        acts = acts.to(torch.float32)
        nonzero = (acts.view(torch.int32) != 0).any(-1) if T else torch.zeros_like(fired)
        stored = fired | nonzero
        cnt = stored.sum(1) * T
        total = int(cnt.sum())
        if self.heap_used + total > self.heap.shape[0]:
            self._room_in_heap(total)
        h0 = self.heap_used
        self.heap[h0 : h0 + total] = acts[stored].reshape(-1)
        self.heap_used = h0 + total
        hoff = torch.cumsum(cnt, 0) - cnt + h0
        return Packed(
            (base + inv).to(self.pidx_dtype),
            pack_bits(fired),
            pack_bits(stored),
            hoff.to(self.hoff_dtype),
        )

    def set(self, rows: torch.Tensor, slots: torch.Tensor, score: torch.Tensor, p: Packed) -> None:
        """Point slots ``(rows, slots)`` at packed windows (the heap values the slots referred
        to before become garbage). The ``(row, slot)`` pairs are distinct."""
        at = self._slot_index(rows, slots)
        before = self._referenced_values(_take(self.hoff, at), _take(self.sbits, at))
        self.heap_live += int(self._referenced_values(p.hoff, p.sbits) - before)
        _put(self.score, at, score.to(torch.float32))
        _put(self.pidx, at, p.pidx)
        _put(self.fbits, at, p.fbits)
        _put(self.sbits, at, p.sbits)
        _put(self.hoff, at, p.hoff)

    def _slot_index(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Flat slot numbers ``row * K + slot``: the per-slot arrays are read and written
        through them (one ``index_select`` / ``index_copy_`` instead of a two-index gather or
        put, measured 3-7x faster on the CPU for 300k slots)."""
        return rows.to(torch.int64) * self.k + slots.to(torch.int64)

    def write(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        score: torch.Tensor,
        pos: torch.Tensor,
        w: Windows,
    ) -> None:
        if rows.numel() == 0:
            return
        self.set(rows, slots, score, self.encode(pos, w.tokens, w.acts, w.fired))

    # -- dense (logical) view -----------------------------------------------------------------------
    def field(self, name: str, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One logical field (``FIELDS``) of filled slots, as the dense layout held it."""
        at = self._slot_index(rows, slots)
        if name == "score":
            return _take(self.score, at)
        pidx = _take(self.pidx, at).to(torch.int64)
        if name == "pos":
            return self.pool_pos.index_select(0, pidx)
        if name == "tokens":
            return self.pool_tokens.index_select(0, pidx)
        w, T = self.width, self.n_types
        if name == "fired":
            return unpack_bits(_take(self.fbits, at), w)
        if name != "acts":
            raise KeyError(name)
        # a slot's stored values lie back to back in the heap from its offset, in window
        # order: gather them for a chunk of slots (a run per slot) and scatter them, in order,
        # into the stored positions (measured 4.5x faster than ranking every position)
        m = int(rows.shape[0])
        out = torch.zeros((m, w, T), dtype=torch.float32, device=self.device)
        for s0 in range(0, m, _DECODE_CHUNK):
            a = at[s0 : s0 + _DECODE_CHUNK]
            sbits = _take(self.sbits, a)
            hoff = _take(self.hoff, a).to(torch.int64)
            cnt = popcount(sbits) * T
            cnt = torch.where(hoff >= 0, cnt, torch.zeros_like(cnt))
            total = int(cnt.sum())
            if not total:
                continue
            src = torch.repeat_interleave(
                hoff - (torch.cumsum(cnt, 0) - cnt), cnt, output_size=total
            )
            src += torch.arange(total, device=self.device)
            stored = unpack_bits(sbits, w)[..., None].expand(-1, w, T)
            out[s0 : s0 + _DECODE_CHUNK].masked_scatter_(stored, self.heap.index_select(0, src))
        return out

    def dense(self, rows: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every logical field of filled slots."""
        return {f: self.field(f, rows, slots) for f in FIELDS}

    def filled_slots(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, slot)`` of every filled slot of ``rows``, row by row, slots ascending."""
        slot = torch.arange(self.k, device=self.device)[None, :].expand(rows.shape[0], self.k)
        ok = slot < self.filled[rows][:, None]
        return rows[:, None].expand_as(slot)[ok], slot[ok]

    @property
    def pos(self) -> torch.Tensor:
        """``[n_rows, K]`` global position of every slot (``-1`` where unfilled)."""
        return self.slot_positions(torch.arange(self.n_rows, device=self.device), -1)

    def slot_positions(self, rows: torch.Tensor, unfilled: int) -> torch.Tensor:
        """``[len(rows), K]`` global position of each slot of ``rows`` (``unfilled`` where
        the slot is empty)."""
        ok = torch.arange(self.k, device=self.device)[None, :] < self.filled[rows][:, None]
        p = self.pidx.index_select(0, rows).to(torch.int64)
        out = torch.full(
            (int(rows.shape[0]), self.k), unfilled, dtype=torch.int64, device=self.device
        )
        out[ok] = self.pool_pos.index_select(0, p[ok])
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes of the layout: per alive row (its slots), and in use in the pool and the heap."""
        row = sum(
            getattr(self, f).element_size() * getattr(self, f)[0].numel()
            for f in self.SLOT_FIELDS
            if getattr(self, f).shape[0]
        )
        return {
            "row": int(row),
            "pool": self.pool_used * (self.width * 4 + 8),
            "heap": self.heap_used * 4,
        }

    # -- state ------------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        n = self.n_rows
        out = {f"{prefix}.component": self.component.clone()}
        for f in self.SLOT_FIELDS:
            out[f"{prefix}.{f}"] = getattr(self, f)[:n].contiguous()
        out[f"{prefix}.pool_tokens"] = self.pool_tokens[: self.pool_used]
        out[f"{prefix}.pool_pos"] = self.pool_pos[: self.pool_used]
        out[f"{prefix}.heap"] = self.heap[: self.heap_used]
        # capacities too, so a resumed bank compacts at the same moments as an uninterrupted one
        out[f"{prefix}.capacity"] = torch.tensor(
            [self.pool_pos.shape[0], self.heap.shape[0]], dtype=torch.int64
        )
        return out

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        dev = self.device
        comp = tensors[f"{prefix}.component"].to(dev, torch.int64)
        n = int(comp.shape[0])
        self.row_of = torch.full((self.n_components,), -1, dtype=torch.int64, device=dev)
        self.row_of[comp] = torch.arange(n, device=dev)
        self.component = comp.clone()
        self._alloc(max(n, self._reserve()))
        if f"{prefix}.tokens" in tensors:  # the dense layout of earlier versions
            self._load_dense(prefix, tensors, n)
            return
        if f"{prefix}.heap" not in tensors:
            raise ConfigError(
                f"the harvest checkpoint's {prefix!r} example bank is in no known layout",
                hint="delete the checkpoint directory to start the harvest over",
            )
        for f in self.SLOT_FIELDS:
            t = tensors[f"{prefix}.{f}"]
            want = getattr(self, f).dtype
            if (f in ("fbits", "sbits") and t.shape[-1] != self.n_words) or t.shape[0] != n:
                raise ConfigError(
                    f"the harvest checkpoint's {prefix}.{f} has shape {list(t.shape)}, which "
                    f"does not fit {n} rows of a {self.width}-token window",
                    hint="resume with the configuration the checkpoint was written with",
                )
            getattr(self, f)[:n] = t.to(dev, want)
        pool_cap, heap_cap = (int(x) for x in tensors[f"{prefix}.capacity"].tolist())
        pt, pp, hp = (tensors[f"{prefix}.{f}"] for f in ("pool_tokens", "pool_pos", "heap"))
        self._alloc_pool(max(pool_cap, int(pp.shape[0])))
        self.pool_tokens[: pp.shape[0]] = pt.to(dev)
        self.pool_pos[: pp.shape[0]] = pp.to(dev)
        self.pool_used = int(pp.shape[0])
        self._alloc_heap(max(heap_cap, int(hp.shape[0])))
        self.heap[: hp.shape[0]] = hp.to(dev)
        self.heap_used = int(hp.shape[0])
        self.heap_live = int(
            self._referenced_values(
                self.hoff[:n].reshape(-1), self.sbits[:n].reshape(-1, self.n_words)
            )
        )

    def _load_dense(self, prefix: str, tensors: dict[str, torch.Tensor], n: int) -> None:
        """Convert a dense-layout bank (``score``/``pos`` ``[n, K]``, ``tokens``/``fired``
        ``[n, K, w]``, ``acts`` ``[n, K, w, T]``) into this layout, slot contents unchanged."""
        dev = self.device
        d = {f: tensors[f"{prefix}.{f}"].to(dev) for f in ("filled", *FIELDS)}
        acts = d["acts"]
        if d["tokens"].shape[1:] != (self.k, self.width) or acts.shape[3] != self.n_types:
            raise ConfigError(
                f"the harvest checkpoint's {prefix!r} example bank has windows of shape "
                f"{list(acts.shape[1:])}, not [{self.k}, {self.width}, {self.n_types}]",
                hint="resume with the configuration the checkpoint was written with",
            )
        self._init_rows(0, n)
        self.filled[:n] = d["filled"]
        self.score[:n] = d["score"]
        rows, slots = self.filled_slots(torch.arange(n, device=dev))
        self.write(
            rows,
            slots,
            d["score"][rows, slots],
            d["pos"][rows, slots],
            Windows(d["tokens"][rows, slots], acts[rows, slots], d["fired"][rows, slots]),
        )


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
    rank = rank_in_runs(sc)
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
    comps: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, bank: ExampleBank
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which of this batch's events (data order) enter the top-K rows, and the slot each takes.

    The top-K of a component ranks by score descending, earlier position first on ties. A
    row's filled slots are the prefix ``0..filled-1`` *in no particular order* (``ranked_slots``
    orders them for the result write and for merges), so an entering event takes a free slot
    or the slot of the entry it pushes out, and no kept entry ever moves. Why: at a million
    components nearly every firing enters while the banks fill, and keeping rows sorted moved
    about half of the kept entries of every touched row at every batch.

    Returns ``(rows, slots, events, touched, filled)``: the ``(row, slot)`` (distinct) each
    entering event (an index into ``comps``) is written to, and the new ``filled`` count of
    every touched row.
    """
    k = bank.k
    dev = comps.device
    row_of_event = bank.row_of[comps]
    if comps.numel() and bool((row_of_event < 0).any()):  # the harvest allocates rows first
        bank.rows_for(torch.unique(comps))
        row_of_event = bank.row_of[comps]
    score = values.to(torch.float32)
    # an event can enter a full row only by beating its worst entry: an equal score loses, as
    # every kept entry has an earlier position than this batch's events
    kth = torch.full_like(score, float("-inf"))
    full = torch.nonzero(bank.filled[row_of_event] >= k).flatten()
    if full.numel():
        kth[full] = bank.score.index_select(0, row_of_event[full]).amin(1)
    cand = torch.nonzero(score > kth).flatten()
    if cand.numel() == 0:
        e = torch.empty(0, dtype=torch.int64, device=dev)
        return e, e, e, e, e
    c_rows = row_of_event[cand]
    o = torch.sort(c_rows, stable=True).indices  # grouped by row, data order within
    cand, c_rows = cand[o], c_rows[o]
    touched, m = torch.unique_consecutive(c_rows, return_counts=True)
    f = bank.filled[touched]
    new_filled = torch.clamp(f + m, max=k)
    over = f + m > k
    over_e = torch.repeat_interleave(over, m)
    # rows with room for all their candidates: slots filled, filled + 1, ...
    simple = torch.nonzero(~over_e).flatten()
    rows_s = c_rows[simple]
    slots_s = torch.repeat_interleave(f, m)[simple] + rank_in_runs(c_rows)[simple]
    if not bool(over.any()):
        return rows_s, slots_s, cand[simple], touched, new_filled
    # a full row with one candidate (the usual case once the banks are full): it beat the
    # worst entry, whose slot it takes, unless the worst score is shared (then the latest
    # of those is the worst, which only the ranking below knows)
    one = torch.nonzero(over & (m == 1) & (f == k)).flatten()
    sc = bank.score.index_select(0, touched[one])
    worst, worst_slot = sc.min(1)
    alone = (sc == worst[:, None]).sum(1) == 1
    one, worst_slot = one[alone], worst_slot[alone]
    start = torch.cumsum(m, 0) - m  # each touched row's first candidate in ``cand``
    rows_1, slots_1, ev_1 = touched[one], worst_slot, cand[start[one]]
    over[one] = False
    over_e = torch.repeat_interleave(over, m)
    if not bool(over.any()):
        return (
            torch.cat([rows_s, rows_1]),
            torch.cat([slots_s, slots_1]),
            torch.cat([cand[simple], ev_1]),
            touched,
            new_filled,
        )
    # the other rows: rank old entries and candidates together, keep K
    R, fR = touched[over], f[over]
    old_rows, old_slots = bank.filled_slots(R)
    at = bank._slot_index(old_rows, old_slots)
    old_pos = bank.pool_pos.index_select(0, _take(bank.pidx, at).to(torch.int64))
    hard = torch.nonzero(over_e).flatten()
    all_rows = torch.cat([old_rows, c_rows[hard]])
    all_score = torch.cat([_take(bank.score, at), score[cand[hard]]])
    all_pos = torch.cat([old_pos, pos[cand[hard]].to(torch.int64)])
    n_old = int(old_rows.shape[0])
    # positions are distinct within a row, so (row, score desc, position) is a total order:
    # by position, then stably by (row, score descending)
    o = torch.sort(all_pos, stable=True).indices
    o = o[torch.sort(all_rows[o] * (1 << 32) + descending_key(all_score[o]), stable=True).indices]
    keep = rank_in_runs(all_rows[o]) < k
    is_old = o < n_old
    evicted = o[~keep & is_old]  # their slots are free again
    entering = o[keep & ~is_old] - n_old  # grouped by row (o is sorted by row)
    # free slots of each row: the evicted entries' and filled..K-1, grouped by row; row r has
    # exactly as many as candidates entering it (K - its surviving old entries)
    spare = k - fR
    sp_rows = torch.repeat_interleave(R, spare)
    sp_slots = torch.repeat_interleave(fR, spare) + rank_in_runs(sp_rows)
    free_rows = torch.cat([old_rows[evicted], sp_rows])
    free_slots = torch.cat([old_slots[evicted], sp_slots])
    g = torch.sort(free_rows, stable=True).indices
    rows_h, slots_h = free_rows[g], free_slots[g]
    ev_h = cand[hard][entering]
    return (
        torch.cat([rows_s, rows_1, rows_h]),
        torch.cat([slots_s, slots_1, slots_h]),
        torch.cat([cand[simple], ev_1, ev_h]),
        touched,
        new_filled,
    )


def ranked_slots(bank: ExampleBank, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), K]`` slot numbers of each row in rank order: score descending, earlier
    position first on ties, unfilled slots last (top-K rows are kept unordered, see
    ``topk_plan``).

    One sort by score per row; only rows with a tie among their scores are sorted again with
    the positions (read from the pool: the costly part, and ties are rare for real-valued
    activations). A filled slot's score is finite (a firing beats a finite threshold), so the
    ``-inf`` of unfilled slots ties with none of them."""
    k = bank.k
    filled = bank.filled[rows]
    ok = torch.arange(k, device=bank.device)[None, :] < filled[:, None]
    score = torch.where(ok, bank.score.index_select(0, rows), float("-inf"))
    ranked, order = torch.sort(score, dim=1, descending=True)
    tie = ((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] > float("-inf"))).any(1)
    t = torch.nonzero(tie).flatten()
    if t.numel():
        order[t] = _ranked_with_positions(bank, rows[t])
    return order


def _ranked_with_positions(bank: ExampleBank, rows: torch.Tensor) -> torch.Tensor:
    """``ranked_slots`` by (score descending, position): a sort by position, then a stable
    sort by score."""
    ok = torch.arange(bank.k, device=bank.device)[None, :] < bank.filled[rows][:, None]
    by_pos = torch.argsort(bank.slot_positions(rows, _MAX64), dim=1, stable=True)
    key = torch.where(ok, descending_key(bank.score.index_select(0, rows)), 1 << 32)
    return by_pos.gather(1, torch.argsort(key.gather(1, by_pos), dim=1, stable=True))


_MAX64 = torch.iinfo(torch.int64).max


def descending_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in ``[0, 2**32)`` that sorts float32 ``x`` descending (``-0.0`` equals ``0.0``)."""
    b = (x.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    ascending = torch.where(b >= 0, b + (1 << 31), -1 - b)
    return (1 << 32) - 1 - ascending

"""The on-disk form of a finished harvest.

::

    <sub-run>/
      harvest.json          config, layout, token counts, schema version (written last: marks completion)
      stats.safetensors     dense per-component arrays + CSR token and co-occurrence tables
      examples.safetensors  example windows of every component, CSR by component (see below)
      harvest.db            SQLite (WAL): ``components`` (one row each: key, site, index,
                            firing count, density; means and maxima are arrays in stats)
      state/                the accumulator checkpoint (single process) or
      shards/rank-R-of-W/   one checkpoint per rank (before ``spd-host harvest merge``)

CSR tables: ``<name>_indptr`` ``[C + 1]``, ``<name>_cols``, ``<name>_values``; row ``c`` is
``cols[indptr[c]:indptr[c+1]]``, so a reader slices one component without loading the rest.
Column indices are int32 where the column count allows. Co-occurrence is stored as its upper
triangle ``cooc_*`` (row ``i``, columns ``j > i``) plus the transpose ``cooc_t_*`` (row ``j``,
columns ``i < j``); component ``c``'s partners are ``cooc_t`` row ``c`` then ``cooc`` row ``c``.
Its counts are int32 when every count fits (exact), else int64.

Examples (per kind ``top`` / ``reservoir``): ``<kind>_indptr`` ``[C + 1]`` and, per example,
``<kind>_score`` ``[E]`` f32, ``<kind>_pos`` ``[E]`` i64, ``<kind>_tokens`` ``[E, 2W+1]`` i32
(``-1`` outside the sequence), ``<kind>_acts`` ``[E, 2W+1, T]`` f32, ``<kind>_fired``
``[E, 2W+1]`` bool. Component ``c``'s examples are rows ``indptr[c]:indptr[c+1]``, top examples
best first, reservoir examples in data order. Why arrays and not one SQLite row per example:
the write is a handful of bulk array writes (a JSON row per example made the final write
dominate the harvest and the result ~20x larger), and a reader slices one component's rows
through ``safe_open`` without loading the rest.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from spd_host.harvest.accumulator import HarvestAccumulator
from spd_host.harvest.checkpoint import atomic_write_text
from spd_host.harvest.config import SCHEMA_VERSION
from spd_host.harvest.exact import PROB_FRAC_BITS
from spd_host.harvest.examples import ExampleBank, ranked_slots
from spd_host.harvest.runs import rank_in_runs
from spd_host.harvest.sorting import sort_with_order
from spd_host.harvest.tensor_file import Entry, Lazy, save_tensors_into_place

RESULT_JSON = "harvest.json"
STATS_FILE = "stats.safetensors"
DB_FILE = "harvest.db"
EXAMPLES_FILE = "examples.safetensors"
EXAMPLE_KINDS = ("top", "reservoir")

_SCHEMA = """
CREATE TABLE components (
  gidx INTEGER PRIMARY KEY, key TEXT NOT NULL, site TEXT NOT NULL, idx INTEGER NOT NULL,
  firing_count INTEGER NOT NULL, density REAL NOT NULL
);
"""
# built after the rows are in (measured 1.3x faster at 1M rows than updating them per insert)
_INDEXES = """
CREATE UNIQUE INDEX components_key ON components(key);
CREATE INDEX components_site ON components(site, idx);
"""


def _narrow_index(x: torch.Tensor, bound: int) -> torch.Tensor:
    """int32 when every value is below ``bound`` < 2**31 (half the bytes), else int64."""
    return x.to(torch.int32) if bound < 2**31 else x


def _lazy_csr(
    name: str, keys: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int, scale: float
) -> dict[str, Entry]:
    """``csr`` of a token table whose column and value arrays are built only when written
    (one at a time: the write never holds the whole CSR copy beside the table). ``scale``
    1.0 keeps int64 counts; otherwise values become float64 times ``scale``."""
    indptr = torch.searchsorted(keys // n_cols, torch.arange(n_rows + 1, dtype=torch.int64))
    E = int(keys.shape[0])
    col_dtype = torch.int32 if n_cols < 2**31 else torch.int64

    def cols() -> torch.Tensor:
        return _narrow_index(keys % n_cols, n_cols).contiguous()

    def vals() -> torch.Tensor:
        return values.contiguous() if scale == 1.0 else values.to(torch.float64) * scale

    val_dtype = values.dtype if scale == 1.0 else torch.float64
    return {
        f"{name}_indptr": indptr,
        f"{name}_cols": Lazy(col_dtype, (E,), cols),
        f"{name}_values": Lazy(val_dtype, (E,), vals),
    }


TRANSPOSE_BLOCK = 1 << 22
"""Keys per block when the co-occurrence transpose is built (bounds the write's scratch)."""


def cooc_tables(keys: torch.Tensor, values: torch.Tensor, n: int) -> dict[str, Entry]:
    """Upper-triangle CSR (``cooc_*``: row ``i``, columns ``j > i``) and its transpose
    (``cooc_t_*``: row ``j``, columns ``i < j``) from sorted keys ``i * n + j``.

    Row ``r`` of the symmetric table is ``cooc_t`` row ``r`` followed by ``cooc`` row ``r``
    (already sorted). Why not store the symmetric table: building it costs a sort and several
    scatters of twice the pairs; the upper triangle is the accumulator's table as it is.
    Why lazy and blockwise: at the default cap (2^26 pairs) a whole-table transpose (row and
    column arrays, a full argsort and its gathers) held ~2.5 GB beside the table at the very
    end of a run. Here each column and value array is built only when it is written, and the
    transpose is a counting sort over blocks of ``TRANSPOSE_BLOCK`` keys: one column count,
    then each block's entries placed at their column's next free slots (blocks in key order,
    a stable sort within a block), which is exactly the stable by-column order of the keys.
    Those slots are computed once, for the columns, and reused for the values (held between
    the two writes as int32: 4 bytes per pair).
    """
    E = int(keys.shape[0])
    narrow = E > 0 and int(values.max()) < 2**31 and int(values.min()) >= -(2**31)
    val_dtype = torch.int32 if narrow else values.dtype  # exact: every count fits
    col_dtype = torch.int32 if n < 2**31 else torch.int64
    blocks = [(s, min(s + TRANSPOSE_BLOCK, E)) for s in range(0, E, TRANSPOSE_BLOCK)]

    def vals() -> torch.Tensor:
        return values.to(val_dtype).contiguous()

    col_counts = torch.zeros(n, dtype=torch.int64)
    for s, e in blocks:
        col_counts += torch.bincount(keys[s:e] % n, minlength=n)
    t_indptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(col_counts, 0, out=t_indptr[1:])

    held: dict[str, torch.Tensor] = {}
    index_dtype = torch.int32 if E < 2**31 else torch.int64

    def destinations() -> torch.Tensor:
        """Each key's slot in the transpose (int32 where it fits: half the bytes held)."""
        dest = torch.empty(E, dtype=index_dtype)
        fill = t_indptr[:-1].clone()  # next free slot of each column
        for s, e in blocks:
            j = keys[s:e] % n
            js, o = sort_with_order(j)
            d = torch.empty(e - s, dtype=torch.int64)
            d[o] = fill[js] + rank_in_runs(js)
            dest[s:e] = d
            fill += torch.bincount(j, minlength=n)
        return dest

    def transposed(source: Callable[[int, int], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # the slots are computed for the first of the two transposed arrays and dropped after
        # the second (the writer builds them one after the other): one sort pass, not two
        if "dest" in held:
            dest = held.pop("dest")
        else:
            dest = held["dest"] = destinations()
        out = torch.empty(E, dtype=dtype)
        for s, e in blocks:
            out.index_copy_(0, dest[s:e].to(torch.int64), source(s, e).to(dtype))
        return out

    return {
        "cooc_indptr": torch.searchsorted(keys // n, torch.arange(n + 1, dtype=torch.int64)),
        "cooc_cols": Lazy(col_dtype, (E,), lambda: _narrow_index(keys % n, n).contiguous()),
        "cooc_values": Lazy(val_dtype, (E,), vals),
        "cooc_t_indptr": t_indptr,
        "cooc_t_cols": Lazy(
            col_dtype, (E,), lambda: transposed(lambda s, e: keys[s:e] // n, col_dtype)
        ),
        "cooc_t_values": Lazy(
            val_dtype, (E,), lambda: transposed(lambda s, e: values[s:e], val_dtype)
        ),
    }


def write_results(
    path: Path, acc: HarvestAccumulator, meta: dict[str, Any], *, concurrent: bool = True
) -> None:
    """Write ``stats.safetensors``, ``examples.safetensors``, ``harvest.db`` and finally
    ``harvest.json``.

    ``concurrent``: the three files are built and written at the same time (the stats and the
    database on two helper threads, the examples here), so one file's CPU work (ranking and
    restoring example windows, merging and transposing the tables, SQLite rows) overlaps
    another's disk writes; each job reads its own part of the accumulator (the stats job alone
    consolidates the pair tables). The files are the same bytes either way."""
    path.mkdir(parents=True, exist_ok=True)
    if acc.device.type != "cpu":  # one copy of the compact state to the host
        acc = HarvestAccumulator.from_state(*acc.state(), device="cpu")
    jobs: list[Callable[[], None]] = [
        lambda: save_tensors_into_place(_stats_entries(acc), path / STATS_FILE),
        lambda: _write_db(path / DB_FILE, acc),
        lambda: save_tensors_into_place(_example_entries(acc), path / EXAMPLES_FILE),
    ]
    if concurrent:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="spd-host-result") as pool:
            helpers = [pool.submit(job) for job in jobs[:2]]
            try:
                jobs[2]()
            finally:
                for h in helpers:  # every file finished (or failed) before anything goes on
                    h.exception()
            for h in helpers:
                h.result()
    else:
        for job in jobs:
            job()
    bound = acc.prune_bound  # a property that sums the tables' prunes: read it once
    unit = 2.0**-PROB_FRAC_BITS
    doc = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "n_tokens": acc.n_tokens,
        "n_batches": acc.n_batches,
        "vocab_size": acc.V,
        "cooc_n_tokens": acc.cooc_n_tokens,
        "kept_mass_total": float(acc.kept_mass_total) * unit,
        # bounded token tables: how much any stored or missing n(c, t) / m(c, t) may be low
        "input_prune_bound": float(bound["input"]),
        "output_prune_bound": float(bound["output"]) * unit,
        "layout": acc.layout.as_json(),
        "config": acc.config.model_dump(mode="json"),
    }
    atomic_write_text(path / RESULT_JSON, json.dumps(doc, indent=1))


def _stats_entries(acc: HarvestAccumulator) -> dict[str, Entry]:
    """``stats.safetensors``: per-component arrays, token tables and co-occurrence (CSR)."""
    C = acc.layout.total
    unit = 2.0**-PROB_FRAC_BITS
    t: dict[str, Entry] = {
        "firing_count": acc.firing_count,
        "sum_all": acc.sum_all.value(),
        "sum_firing": acc.sum_firing.value(),
        "max_firing": acc.max_firing,
        "hist": acc.hist,
        "hist_edges": acc.hist_edges,
        "token_count": acc.token_count,
        "next_token_mass": acc.next_token_mass.to(torch.float64) * unit,
        "output_kept_mass": acc.output_kept_mass.to(torch.float64) * unit,
        "cooc_count": acc.cooc_count,
    }
    for name, counter in (("input", acc.input_pairs), ("output", acc.output_pairs)):
        counter.consolidate()
        t.update(
            _lazy_csr(
                name, counter.keys, counter.values, C, acc.V, 1.0 if name == "input" else unit
            )
        )
    acc.cooc.consolidate()
    t.update(cooc_tables(acc.cooc.keys, acc.cooc.values, C))
    return t


def _example_entries(acc: HarvestAccumulator) -> dict[str, Entry]:
    """``examples.safetensors``: both banks as CSR arrays by component."""
    ex: dict[str, Entry] = {}
    for kind, bank in zip(EXAMPLE_KINDS, (acc.top, acc.reservoir), strict=True):
        arrays = example_arrays(bank, acc.layout.total, ordered_by_pos=kind == "reservoir")
        for k, v in arrays.items():
            ex[f"{kind}_{k}"] = v
    return ex


def _write_db(db_path: Path, acc: HarvestAccumulator) -> None:
    tmp = db_path.with_name(f".{db_path.name}.tmp")
    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    # a temporary file renamed into place when complete: no journal or syncs while building
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.executescript(_SCHEMA)
    N = max(acc.n_tokens, 1)
    # one row per component that fired: dead components cost nothing here (their count, 0,
    # is in stats.safetensors like every other component's)
    alive = torch.nonzero(acc.firing_count).flatten()
    fc = acc.firing_count[alive].tolist()
    offsets = torch.tensor(acc.layout.offsets, dtype=torch.int64)
    site_of = torch.searchsorted(offsets, alive, right=True) - 1
    local = (alive - offsets[site_of]).tolist()
    names = [acc.layout.names[i] for i in site_of.tolist()]
    con.executemany(
        "INSERT INTO components VALUES (?,?,?,?,?,?)",
        (
            (g, f"{site}:{i}", site, i, f, f / N)
            for g, site, i, f in zip(alive.tolist(), names, local, fc, strict=True)
        ),
    )
    con.executescript(_INDEXES)
    con.commit()
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    tmp.replace(db_path)


def example_arrays(bank: ExampleBank, n_components: int, *, ordered_by_pos: bool) -> dict[str, Any]:
    """A bank's filled entries as CSR arrays by component (vectorised: no per-example Python).

    Within a component entries are ranked (top: best first, earlier position first on ties;
    its slots are unordered) or, with ``ordered_by_pos``, sorted by position (reservoir: data
    order). The per-example arrays are ``Lazy``: each
    is gathered when the writer reaches it and dropped after, so the write never holds a
    second copy of the bank.
    """
    k = bank.k
    n = bank.n_rows
    order = torch.argsort(bank.component)  # rows by component index
    rows = order
    filled = bank.filled[:n][rows]
    slot = torch.arange(k)[None, :].expand(n, k)
    if ordered_by_pos and n:
        key = bank.slot_positions(rows, torch.iinfo(torch.int64).max)  # empty slots last
        slot = torch.argsort(key, dim=1, stable=True)
    elif n:  # top-K rows are kept unordered: best first, earlier position first on ties
        slot = torch.cat(
            [ranked_slots(bank, rows[r0 : r0 + _RANK_ROWS]) for r0 in range(0, n, _RANK_ROWS)]
        )
    ok = torch.arange(k)[None, :] < filled[:, None]
    r = rows[:, None].expand(n, k)[ok]
    sl = slot[ok]
    counts = torch.zeros(n_components, dtype=torch.int64)
    counts[bank.component[rows]] = filled
    indptr = torch.zeros(n_components + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    out: dict[str, Any] = {"indptr": indptr}
    E = int(r.shape[0])
    w, T = bank.width, bank.n_types
    specs = {
        "score": (torch.float32, (E,)),
        "pos": (torch.int64, (E,)),
        "tokens": (torch.int32, (E, w)),
        "acts": (torch.float32, (E, w, T)),
        "fired": (torch.bool, (E, w)),
    }
    for f, (dtype, shape) in specs.items():
        out[f] = Lazy(dtype, shape, _gather(bank, f, r, sl), _gather_chunks(bank, f, r, sl))
    return out


_RANK_ROWS = 1 << 18
"""Rows ranked at once by ``example_arrays`` (bounds the ``[rows, K]`` temporaries)."""

WRITE_CHUNK = 1 << 20
"""Slots per chunk when a bank field is restored for the result write (~70 MB of windows)."""


def _gather(
    bank: ExampleBank, name: str, rows: torch.Tensor, slots: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """One field of the bank's dense (logical) layout, restored when the writer reaches it."""
    return lambda: bank.field(name, rows, slots)


def _gather_chunks(
    bank: ExampleBank, name: str, rows: torch.Tensor, slots: torch.Tensor
) -> Callable[[], Iterator[torch.Tensor]]:
    """The same field restored ``WRITE_CHUNK`` slots at a time. Why: at a million alive
    components a whole field (e.g. ``[E, 17]`` tokens or activations for E ~ 40M slots, plus
    its index temporaries) was several GB at the very end of the run, the harvest's peak."""

    def chunks() -> Iterator[torch.Tensor]:
        for s in range(0, int(rows.shape[0]), WRITE_CHUNK):
            yield bank.field(name, rows[s : s + WRITE_CHUNK], slots[s : s + WRITE_CHUNK])

    return chunks

"""The on-disk form of a finished harvest.

::

    <sub-run>/
      harvest.json          config, layout, token counts, schema version (written last: marks completion)
      stats.safetensors     dense per-component arrays + CSR token and co-occurrence tables
      harvest.db            SQLite (WAL): ``components`` (one row each), ``examples`` (one row each)
      state/                the accumulator checkpoint (single process) or
      shards/rank-R-of-W/   one checkpoint per rank (before ``spd-host harvest merge``)

CSR tables: ``<name>_indptr`` ``[C + 1]``, ``<name>_cols``, ``<name>_values``; row ``c`` is
``cols[indptr[c]:indptr[c+1]]``, so a reader slices one component without loading the rest.
The co-occurrence table is stored symmetrically (both ``(i, j)`` and ``(j, i)``).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from spd_host.harvest.accumulator import HarvestAccumulator
from spd_host.harvest.checkpoint import atomic_write_text
from spd_host.harvest.config import SCHEMA_VERSION
from spd_host.harvest.windows import PAD

RESULT_JSON = "harvest.json"
STATS_FILE = "stats.safetensors"
DB_FILE = "harvest.db"

_SCHEMA = """
CREATE TABLE components (
  gidx INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, site TEXT NOT NULL, idx INTEGER NOT NULL,
  firing_count INTEGER NOT NULL, density REAL NOT NULL, stats TEXT NOT NULL
);
CREATE INDEX components_site ON components(site, idx);
CREATE TABLE examples (
  key TEXT NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, score REAL NOT NULL,
  position INTEGER NOT NULL, centre INTEGER NOT NULL, tokens TEXT NOT NULL,
  activations TEXT NOT NULL, firings TEXT NOT NULL, PRIMARY KEY (key, kind, rank)
) WITHOUT ROWID;
"""


def csr(keys: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int) -> dict[str, torch.Tensor]:
    rows = keys // n_cols
    indptr = torch.searchsorted(rows, torch.arange(n_rows + 1, dtype=torch.int64))
    return {"indptr": indptr, "cols": (keys % n_cols).contiguous(), "values": values.contiguous()}


def write_results(path: Path, acc: HarvestAccumulator, meta: dict[str, Any]) -> None:
    """Write ``stats.safetensors``, ``harvest.db`` and finally ``harvest.json``."""
    path.mkdir(parents=True, exist_ok=True)
    C = acc.layout.total
    t: dict[str, torch.Tensor] = {
        "firing_count": acc.firing_count,
        "sum_all": acc.sum_all,
        "sum_firing": acc.sum_firing,
        "max_firing": acc.max_firing,
        "hist": acc.hist,
        "hist_edges": acc.hist_edges,
        "token_count": acc.token_count,
        "next_token_mass": acc.next_token_mass,
        "output_kept_mass": acc.output_kept_mass,
        "cooc_count": acc.cooc_count,
    }
    for name, counter in (("input", acc.input_pairs), ("output", acc.output_pairs)):
        counter.consolidate()
        for k, v in csr(counter.keys, counter.values, C, acc.V).items():
            t[f"{name}_{k}"] = v
    acc.cooc.consolidate()
    i, j = acc.cooc.keys // C, acc.cooc.keys % C
    sym = torch.cat([i * C + j, j * C + i])
    order = torch.sort(sym).indices
    for k, v in csr(sym[order], torch.cat([acc.cooc.values, acc.cooc.values])[order], C, C).items():
        t[f"cooc_{k}"] = v
    tmp = path / f".{STATS_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
    tmp.replace(path / STATS_FILE)
    _write_db(path / DB_FILE, acc)
    doc = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "n_tokens": acc.n_tokens,
        "n_batches": acc.n_batches,
        "vocab_size": acc.V,
        "cooc_n_tokens": acc.cooc_n_tokens,
        "kept_mass_total": float(acc.kept_mass_total),
        "layout": acc.layout.as_json(),
        "config": acc.config.model_dump(mode="json"),
    }
    atomic_write_text(path / RESULT_JSON, json.dumps(doc, indent=1))


def _write_db(db_path: Path, acc: HarvestAccumulator) -> None:
    tmp = db_path.with_name(f".{db_path.name}.tmp")
    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    con.executescript(_SCHEMA)
    types = acc.layout.act_types
    N = max(acc.n_tokens, 1)
    fc = acc.firing_count.tolist()
    mean_all = (acc.sum_all / N).tolist()
    mean_f = (acc.sum_firing / acc.firing_count.clamp(min=1)).tolist()
    mx = acc.max_firing.tolist()

    def comp_rows() -> Any:
        g = 0
        for site, n in zip(acc.layout.names, acc.layout.sizes, strict=True):
            for idx in range(n):
                f = fc[g]
                stats = {
                    "mean_all": {t: mean_all[i][g] for i, t in enumerate(types)},
                    "mean_firing": {t: (mean_f[i][g] if f else None) for i, t in enumerate(types)},
                    "max_firing": {t: (mx[i][g] if f else None) for i, t in enumerate(types)},
                }
                yield (g, f"{site}:{idx}", site, idx, f, f / N, json.dumps(stats))
                g += 1

    con.executemany("INSERT INTO components VALUES (?,?,?,?,?,?,?)", comp_rows())
    for kind, bank in (("top", acc.top), ("reservoir", acc.reservoir)):
        con.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?)", _example_rows(kind, bank, acc))
    con.commit()
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    tmp.replace(db_path)


def _example_rows(kind: str, bank: Any, acc: HarvestAccumulator) -> Any:
    W = acc.config.context_tokens
    types = acc.layout.act_types
    for r in range(bank.n_rows):
        key = acc.layout.key(int(bank.component[r]))
        n = int(bank.filled[r])
        if n == 0:
            continue
        if kind == "top":
            order = list(range(n))
        else:  # reservoir: present in data order
            order = torch.argsort(bank.pos[r, :n]).tolist()
        toks_all = bank.tokens[r].tolist()
        acts_all = bank.acts[r].tolist()
        fired_all = bank.fired[r].tolist()
        for rank, slot in enumerate(order):
            toks = toks_all[slot]
            lo = 0
            while lo < W and toks[lo] == PAD:
                lo += 1
            hi = len(toks)
            while hi > W + 1 and toks[hi - 1] == PAD:
                hi -= 1
            acts = {t: [a[i] for a in acts_all[slot][lo:hi]] for i, t in enumerate(types)}
            yield (
                key, kind, rank, float(bank.score[r, slot]), int(bank.pos[r, slot]), W - lo,
                json.dumps(toks[lo:hi]), json.dumps(acts), json.dumps(fired_all[slot][lo:hi]),
            )

"""The component index: a SQLite cache (with FTS5) built lazily beside the harvest.

Why a cache: sorting, filtering and paginating 1,000,000 components per request must not
touch a million summaries; SQLite answers ``ORDER BY ... LIMIT`` from an index in
milliseconds. The cache lives at ``<harvest sub-run>/viewer/index.db`` and is rebuilt when
the harvest changes; labels and eval scores are refreshed when their files change.

Built in two steps:

1. *base* (synchronous, once): one row per component from ``HarvestRepo.summary()`` (site,
   firing density, mean/max of the primary activation), the newest ok label with its
   provenance, and the judge suites' per-component scores; FTS over labels.
2. *tokens* (a background thread, in chunks): each alive component's top input and output
   tokens by PMI (``HarvestRepo.token_stats``), added to the FTS table so search covers them.
   ``tokens_done`` / ``tokens_total`` say how far it is; a static export waits for it.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spd_host.errors import ConfigError
from spd_host.viewer.source import JUDGE_SUITES, DecompositionSource, finite

INDEX_VERSION = 2
SORTS = {
    "key": "gidx",
    "site": "gidx",  # harvest order is site order, then index
    "density": "density",
    "mean": "mean_act",
    "max": "max_act",
    "label": "label",
    "detection": "detection",
    "fuzzing": "fuzzing",
    "intruder": "intruder",
}
DENSITY_BINS = [-8.0 + 0.25 * i for i in range(33)]  # log10 density edges, 1e-8 .. 1
TOKEN_CHUNK = 2000
TOP_TOKENS = 5

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE components (
  gidx INTEGER PRIMARY KEY, key TEXT NOT NULL, site TEXT NOT NULL, site_order INTEGER NOT NULL,
  idx INTEGER NOT NULL, firing_count INTEGER NOT NULL, density REAL NOT NULL,
  mean_act REAL, max_act REAL, alive INTEGER NOT NULL,
  label TEXT, label_model TEXT, label_strategy TEXT, label_baseline INTEGER,
  detection REAL, fuzzing REAL, intruder REAL,
  input_tokens TEXT, output_tokens TEXT, input_ids TEXT
);
CREATE VIRTUAL TABLE fts USING fts5(label, tokens, tokenize = 'unicode61');
"""
# Every sort column is indexed together with gidx (the tie-break), so ``ORDER BY col, gidx``
# in either direction is an index walk that stops after one page, even over 1M rows.
_INDEXES = """
CREATE UNIQUE INDEX c_key ON components(key);
CREATE INDEX c_site ON components(site, gidx);
CREATE INDEX c_alive ON components(alive, gidx);
CREATE INDEX c_density ON components(density, gidx);
CREATE INDEX c_site_density ON components(site, density, gidx);
CREATE INDEX c_mean ON components(mean_act, gidx);
CREATE INDEX c_max ON components(max_act, gidx);
CREATE INDEX c_label ON components(label, gidx);
CREATE INDEX c_detection ON components(detection, gidx);
CREATE INDEX c_fuzzing ON components(fuzzing, gidx);
CREATE INDEX c_intruder ON components(intruder, gidx);
"""


@dataclass(frozen=True)
class IndexQuery:
    """What the index page asks for; validated so a bad URL gets a one-line error."""

    sort: str = "density"
    desc: bool = True
    site: str | None = None
    dmin: float | None = None
    dmax: float | None = None
    score: str | None = None  # detection | fuzzing | intruder
    smin: float | None = None
    alive: str = "all"  # all | alive | dead
    q: str | None = None
    page: int = 1
    per_page: int = 50

    def validated(self) -> IndexQuery:
        if self.sort not in SORTS:
            raise ConfigError(
                f"unknown sort column {self.sort!r}", hint=f"one of: {', '.join(SORTS)}"
            )
        if self.score is not None and self.score not in JUDGE_SUITES:
            raise ConfigError(
                f"unknown score {self.score!r}", hint=f"one of: {', '.join(JUDGE_SUITES)}"
            )
        if self.alive not in ("all", "alive", "dead"):
            raise ConfigError(f"alive must be all, alive or dead, got {self.alive!r}")
        if self.page < 1 or not 1 <= self.per_page <= 1000:
            raise ConfigError("page must be >= 1 and per_page between 1 and 1000")
        return self


def fts_query(text: str) -> str:
    """User text -> an FTS5 query: every word must match (as a prefix), quotes escaped."""
    words = [w for w in text.replace('"', " ").split() if w]
    return " ".join(f'"{w}"*' for w in words)


class ComponentIndex:
    """The cache of one decomposition's components (thread-safe: one connection per call)."""

    def __init__(self, source: DecompositionSource, path: Path | None = None) -> None:
        self.source = source
        self.path = path or source.repo.path / "viewer" / "index.db"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- connections ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def _meta(self, con: sqlite3.Connection, key: str) -> str | None:
        row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- building ---------------------------------------------------------------------------------
    def ensure(self, *, background_tokens: bool = True) -> ComponentIndex:
        """Build what is missing or stale; start (or finish, if not background) the token pass."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        harvest_id = str(self.source.repo.path.resolve())
        ok = False
        if self.path.exists():
            try:
                with self._connect() as con:
                    ok = (
                        self._meta(con, "version") == str(INDEX_VERSION)
                        and self._meta(con, "harvest") == harvest_id
                        and self._meta(con, "base_done") == "1"
                    )
            except sqlite3.DatabaseError:
                ok = False
        if not ok:
            self._build_base(harvest_id)
        fp = self.source.fingerprint()
        with self._connect() as con:
            stale = self._meta(con, "fingerprint") != fp
        if stale:
            self._refresh_labels(fp)
        if background_tokens:
            self.start_tokens()
        else:
            self._token_pass()
        return self

    def _build_base(self, harvest_id: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        repo = self.source.repo
        primary = self.source.primary
        order = {s: i for i, s in enumerate(repo.layout.names)}
        con = sqlite3.connect(self.path)
        con.execute("PRAGMA journal_mode=OFF")  # a cache: rebuilt from scratch if interrupted
        con.execute("PRAGMA synchronous=OFF")
        try:
            con.executescript(_TABLES)
            rows = (
                (
                    g,
                    s.key,
                    s.site,
                    order[s.site],
                    s.index,
                    s.firing_count,
                    s.density,
                    finite(s.mean_firing.get(primary)),
                    finite(s.max_firing.get(primary)),
                    int(s.firing_count > 0),
                )
                for g, s in enumerate(repo.summary())
            )
            con.executemany(
                "INSERT INTO components (gidx, key, site, site_order, idx, firing_count, density,"
                " mean_act, max_act, alive) VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            con.executescript(_INDEXES)
            hist = self._density_histogram(con)
            n_alive = con.execute("SELECT count(*) FROM components WHERE alive=1").fetchone()[0]
            meta = {
                "version": str(INDEX_VERSION),
                "harvest": harvest_id,
                "density_histogram": json.dumps(hist),
                "tokens_done": "0",
                "tokens_indexed": "0",
                "n_components": str(repo.layout.total),
                "n_alive": str(n_alive),
                "base_done": "1",
            }
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            con.commit()
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()

    def _density_histogram(self, con: sqlite3.Connection) -> dict[str, Any]:
        """Per site: counts of log10(density) in ``DENSITY_BINS`` and the dead count."""
        out: dict[str, Any] = {"edges": DENSITY_BINS, "sites": {}}
        lo, step, nb = DENSITY_BINS[0], 0.25, len(DENSITY_BINS) - 1
        for site in self.source.repo.layout.names:
            counts = [0] * nb
            dead = 0
            for (d,) in con.execute("SELECT density FROM components WHERE site=?", (site,)):
                if d <= 0:
                    dead += 1
                    continue
                b = min(nb - 1, max(0, int((math.log10(d) - lo) // step)))
                counts[b] += 1
            out["sites"][site] = {"counts": counts, "dead": dead}
        return out

    def _refresh_labels(self, fingerprint: str) -> None:
        labels = self.source.best_labels()
        scores = self.source.judge_scores()
        con = self._connect()
        try:
            con.execute(
                "UPDATE components SET label=NULL, label_model=NULL, label_strategy=NULL,"
                " label_baseline=NULL, detection=NULL, fuzzing=NULL, intruder=NULL"
                " WHERE label IS NOT NULL OR detection IS NOT NULL OR fuzzing IS NOT NULL"
                " OR intruder IS NOT NULL"
            )
            con.executemany(
                "UPDATE components SET label=?, label_model=?, label_strategy=?, label_baseline=?"
                " WHERE key=?",
                (
                    (r.label, f"{r.provider}/{r.model}", r.strategy, int(r.is_baseline), k)
                    for k, r in labels.items()
                ),
            )
            for suite in JUDGE_SUITES:
                con.executemany(
                    f"UPDATE components SET {suite}=? WHERE key=?",
                    ((v, k) for k, v in scores.get(suite, {}).items()),
                )
            con.execute("DELETE FROM fts")
            con.execute(
                "INSERT INTO fts(rowid, label, tokens) SELECT gidx, coalesce(label, ''),"
                " coalesce(input_tokens, '') || ' ' || coalesce(output_tokens, '') FROM components"
                " WHERE label IS NOT NULL OR input_ids IS NOT NULL"
            )
            con.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (fingerprint,))
            con.commit()
        finally:
            con.close()

    def start_tokens(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._token_pass, daemon=True, name="tokens")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _token_pass(self) -> None:
        """Top input/output tokens of every alive component not yet done, in chunks."""
        repo = self.source.repo
        con = self._connect()
        try:
            while not self._stop.is_set():
                todo = con.execute(
                    "SELECT gidx, key FROM components WHERE alive=1 AND input_ids IS NULL"
                    " ORDER BY gidx LIMIT ?",
                    (TOKEN_CHUNK,),
                ).fetchall()
                if not todo:
                    break
                updates = []
                for g, key in todo:
                    ins = repo.token_stats(key, "input", top=TOP_TOKENS).top_pmi
                    outs = repo.token_stats(key, "output", top=TOP_TOKENS).top_pmi
                    updates.append(
                        (
                            " ".join(self.source.decode(t.token).strip() for t in ins),
                            " ".join(self.source.decode(t.token).strip() for t in outs),
                            " ".join(str(t.token) for t in ins),
                            g,
                        )
                    )
                con.executemany(
                    "UPDATE components SET input_tokens=?, output_tokens=?, input_ids=?"
                    " WHERE gidx=?",
                    updates,
                )
                gids = [(g,) for *_, g in updates]
                con.executemany("DELETE FROM fts WHERE rowid=?", gids)
                con.executemany(
                    "INSERT INTO fts(rowid, label, tokens) SELECT gidx, coalesce(label, ''),"
                    " input_tokens || ' ' || output_tokens FROM components WHERE gidx=?",
                    gids,
                )
                con.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key='tokens_indexed'",
                    (len(updates),),
                )
                con.commit()
            if not self._stop.is_set():
                con.execute("INSERT OR REPLACE INTO meta VALUES ('tokens_done', '1')")
                con.commit()
        finally:
            con.close()

    # -- queries ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counts kept in ``meta`` (no table scan per page view)."""
        with self._connect() as con:
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        return {
            "components": int(meta.get("n_components", 0)),
            "alive": int(meta.get("n_alive", 0)),
            "tokens_indexed": int(meta.get("tokens_indexed", 0)),
            "tokens_done": meta.get("tokens_done") == "1",
        }

    def density_histogram(self) -> dict[str, Any]:
        with self._connect() as con:
            return dict(json.loads(self._meta(con, "density_histogram") or "{}"))

    def query(self, q: IndexQuery) -> tuple[list[dict[str, Any]], int]:
        """One page of rows and the number of rows matching the filters.

        Order: ``col`` then ``gidx``, both in the asked direction, rows without a value last.
        Non-null rows and null rows are two index walks (a single ``ORDER BY col IS NULL``
        would sort every row).
        """
        q = q.validated()
        where, args = self._where(q)
        col = SORTS[q.sort]
        d = "DESC" if q.desc else "ASC"
        offset, limit = (q.page - 1) * q.per_page, q.per_page
        nullable = col != "gidx" and col != "density"

        def clause(extra: list[str]) -> str:
            parts = where + extra
            return f" WHERE {' AND '.join(parts)}" if parts else ""

        with self._connect() as con:
            con.row_factory = sqlite3.Row
            if not where:
                total = int(self._meta(con, "n_components") or 0)
            else:
                total = con.execute(
                    f"SELECT count(*) FROM components{clause([])}", args
                ).fetchone()[0]
            first = [f"{col} IS NOT NULL"] if nullable else []
            rows = con.execute(
                f"SELECT * FROM components{clause(first)} ORDER BY {col} {d}, gidx {d}"
                " LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            if nullable and len(rows) < limit:
                n_values = con.execute(
                    f"SELECT count(*) FROM components{clause(first)}", args
                ).fetchone()[0]
                rows += con.execute(
                    f"SELECT * FROM components{clause([f'{col} IS NULL'])} ORDER BY gidx {d}"
                    " LIMIT ? OFFSET ?",
                    [*args, limit - len(rows), max(0, offset - n_values)],
                ).fetchall()
        return [dict(r) for r in rows], int(total)

    def _where(self, q: IndexQuery) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if q.site:
            where.append("site = ?")
            args.append(q.site)
        if q.dmin is not None:
            where.append("density >= ?")
            args.append(q.dmin)
        if q.dmax is not None:
            where.append("density <= ?")
            args.append(q.dmax)
        if q.score and q.smin is not None:
            where.append(f"{q.score} >= ?")
            args.append(q.smin)
        if q.alive != "all":
            where.append("alive = ?")
            args.append(1 if q.alive == "alive" else 0)
        if q.q and fts_query(q.q):
            where.append("gidx IN (SELECT rowid FROM fts WHERE fts MATCH ?)")
            args.append(fts_query(q.q))
        return where, args

    def keys(self, q: IndexQuery, limit: int | None = None) -> list[str]:
        """Every matching key in the query's order (for static exports)."""
        rows, total = self.query(IndexQuery(**{**q.__dict__, "page": 1, "per_page": 1}))
        n = total if limit is None else min(limit, total)
        out: list[str] = []
        page = 1
        while len(out) < n:
            rows, _ = self.query(IndexQuery(**{**q.__dict__, "page": page, "per_page": 1000}))
            if not rows:
                break
            out += [r["key"] for r in rows]
            page += 1
        return out[:n]

    def row(self, key: str) -> dict[str, Any] | None:
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            r = con.execute("SELECT * FROM components WHERE key=?", (key,)).fetchone()
        return None if r is None else dict(r)

    def neighbours(self, gidx: int) -> tuple[str | None, str | None]:
        """Previous and next component keys in harvest order (keyboard navigation)."""
        with self._connect() as con:
            prev = con.execute("SELECT key FROM components WHERE gidx=?", (gidx - 1,)).fetchone()
            nxt = con.execute("SELECT key FROM components WHERE gidx=?", (gidx + 1,)).fetchone()
        return (prev[0] if prev else None, nxt[0] if nxt else None)

    def token_rows(self, sites: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """Alive components of ``sites`` with their top input token ids (compare view)."""
        marks = ",".join("?" * len(sites))
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute(
                f"SELECT gidx, key, site, density, label, input_ids, input_tokens FROM components"
                f" WHERE site IN ({marks}) AND alive=1 AND input_ids IS NOT NULL"
                " ORDER BY density DESC LIMIT ?",
                [*sites, limit],
            ).fetchall()
        return [dict(r) for r in rows]
